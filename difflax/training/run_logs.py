"""Optional experiment logs of the training loop: TensorBoard event files and Weights & Biases.

Each is an `AbstractRunLog` that takes the loop's scalars (as "train/<name>") and sample grids
("samples"); `open_run_logs` opens those that `TrainConfig` asks for (`tensorboard`, `wandb`),
on process 0 only. Both are off by default and need their package
(`pip install 'difflax[tensorboard]'`, `pip install 'difflax[wandb]'`).
"""
from __future__ import annotations

import abc
import os
import secrets
import time

import numpy as np


class AbstractRunLog(abc.ABC):
    """Where the training loop's scalars and grids go, besides metrics.jsonl and samples/."""

    @abc.abstractmethod
    def scalars(self, record: dict, step: int) -> None:
        """Each value of `record` but "step" as the scalar "train/<name>" at `step`."""

    @abc.abstractmethod
    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A uint8 image (H, W, C), C in {1, 3}, at `step`."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Called before each checkpoint: what was logged is written out."""

    @abc.abstractmethod
    def close(self) -> None:
        """Called once at the end of the run (or when it fails)."""


def _scalars(record: dict) -> dict:
    return {f"train/{name}": value for name, value in record.items() if name != "step"}


class TensorBoardLog(AbstractRunLog):
    """TensorBoard event files in workdir/tensorboard, written synchronously (tensorboardX's
    `EventsWriter`, no background thread), so what is logged before a checkpoint is on disk
    with it. A run resumed at step `start` opens a new file that starts with a SessionLog
    START at start + 1: TensorBoard then drops the earlier files' events of later steps (those
    of a killed run after its last checkpoint)."""

    def __init__(self, workdir: str, start: int):
        try:
            from tensorboardX import summary
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog
        except ImportError as e:
            raise ImportError("train.tensorboard = True needs tensorboardX: pip install "
                              "'difflax[tensorboard]' (or set train.tensorboard = False)") from e
        os.makedirs(os.path.join(workdir, "tensorboard"), exist_ok=True)
        self._summary, self._event = summary, Event
        self._writer = EventsWriter(os.path.join(workdir, "tensorboard", "events"))
        self._writer.write_event(Event(step=start + 1, wall_time=time.time(),
                                       session_log=SessionLog(status=SessionLog.START)))

    def scalars(self, record: dict, step: int) -> None:
        for tag, value in _scalars(record).items():
            self._write(self._summary.scalar(tag, value), step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self._write(self._summary.image(tag, image, dataformats="HWC"), step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def _write(self, summary, step: int) -> None:
        self._writer.write_event(self._event(summary=summary, step=step, wall_time=time.time()))


class WandbLog(AbstractRunLog):
    """A Weights & Biases run of `project` (`wandb.init(project=, dir=workdir, config=,
    resume="allow", id=)`), its files under workdir/wandb. The run id is drawn once and kept
    in workdir/wandb_id, so that a resumed training run continues the same W&B run.
    `WANDB_MODE=offline` keeps it on disk (`wandb sync workdir/wandb/offline-run-*` uploads
    it later). W&B ignores steps at or below one it already has: after a run killed past its
    last checkpoint, the resumed run's first steps up to where the killed one got are the
    killed run's values."""

    def __init__(self, project: str, workdir: str, config: dict):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("train.wandb needs Weights & Biases: pip install 'difflax[wandb]' "
                              "(or set train.wandb = '')") from e
        self._wandb = wandb
        self._run = wandb.init(project=project, dir=workdir, config=config, resume="allow",
                               id=run_id(workdir))

    def scalars(self, record: dict, step: int) -> None:
        self._run.log(_scalars(record), step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self._run.log({tag: self._wandb.Image(image[..., 0] if image.shape[-1] == 1 else image)},
                      step=step)

    def flush(self) -> None:
        """Nothing to do: wandb hands each `log` to its own writer process."""

    def close(self) -> None:
        self._run.finish()


def run_id(workdir: str) -> str:
    """The W&B run id of this workdir: read from workdir/wandb_id, or drawn and written there."""
    path = os.path.join(workdir, "wandb_id")
    if not os.path.exists(path):
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            f.write(secrets.token_hex(8))
    with open(path) as f:
        return f.read().strip()


def open_run_logs(cfg, workdir: str, start: int, config: dict) -> list[AbstractRunLog]:
    """The logs `cfg` (a TrainConfig) turns on: TensorBoard if `cfg.tensorboard`, W&B if
    `cfg.wandb` names a project. `start`: the step the run resumes from; `config`: the run's
    configuration, recorded by W&B. Call on process 0 only."""
    logs = []
    try:
        if cfg.tensorboard:
            logs.append(TensorBoardLog(workdir, start))
        if cfg.wandb:
            logs.append(WandbLog(cfg.wandb, workdir, config))
    except BaseException:  # one failed to open: close those already open
        for log in logs:
            log.close()
        raise
    return logs
