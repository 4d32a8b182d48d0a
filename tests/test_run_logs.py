"""Weights & Biases logging of the training loop (`TrainConfig.wandb`), in W&B's offline mode:
the run's records are read back from its offline run file (run-<id>.wandb)."""
import dataclasses
import glob
import json
import os
import struct
import sys

import pytest

import train_tiny
from difflax import data
from difflax.training import train
from difflax.training.run_logs import WandbLog


def wandb_records(path):
    """The protobuf Records of an offline W&B run file: a ":W&B" header (7 bytes), then
    LevelDB-log records (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB
    blocks, a block's tail of fewer than 7 bytes zero-padded."""
    from wandb.proto import wandb_internal_pb2

    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B"
    records, pos, part, block = [], 7, b"", 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        part, pos = part + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(part))
            part = b""
    return records


def offline_runs(workdir):
    """[(run id, config {key: value}, history {step: {key: value}})] of workdir/wandb, oldest
    first."""
    runs = []
    for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))):
        run_id, config, history = None, {}, {}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in record.history.item}
                history[record.history.step.num] = items
        runs.append((run_id, config, history))
    return runs


def test_wandb_logs_the_loss_and_grids_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = str(tmp_path)
    cfg = dataclasses.replace(train_tiny.config(2), log_every=1, sample_every=2,
                              tensorboard=False, wandb="difflax-test")
    batches = lambda start: data.batch_iterator("digits", train_tiny.BATCH, seed=0,  # noqa: E731
                                                start_step=start,
                                                resolution=train_tiny.RESOLUTION)
    run = lambda steps: train(dataclasses.replace(cfg, steps=steps), train_tiny.TinyDenoiser(),  # noqa: E731
                              batches, workdir, sample_fn=train_tiny.sample_fn, progress=False)
    run(2)
    run(4)  # resumed from the checkpoint of step 2

    jsonl = {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))}
    (first, config, history), (second, _, resumed) = offline_runs(workdir)
    assert first == second == open(tmp_path / "wandb_id").read()
    assert config["train"]["wandb"] == "difflax-test" and config["train"]["steps"] == 2
    assert sorted(history) == [1, 2] and sorted(resumed) == [3, 4]
    logged = {**history, **resumed}
    assert {s: logged[s]["train/loss"] for s in logged} == pytest.approx(jsonl, rel=1e-6)
    assert {"train/grad_norm", "train/lr", "train/steps_per_sec"} <= set(logged[1])
    assert logged[2]["samples/_type"] == "image-file" == logged[4]["samples/_type"]


def test_wandb_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'difflax\[wandb\]'"):
        WandbLog("project", str(tmp_path), {})


def test_a_log_that_fails_to_open_closes_the_others(tmp_path, monkeypatch):
    """W&B missing after TensorBoard opened: the ImportError names the extra, and the
    TensorBoard writer is closed, not left open."""
    pytest.importorskip("tensorboardX")
    from difflax.training import TrainConfig
    from difflax.training import run_logs

    closed = []
    monkeypatch.setattr(run_logs.TensorBoardLog, "close", lambda self: closed.append(self))
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = TrainConfig(tensorboard=True, wandb="project")
    with pytest.raises(ImportError, match="difflax\\[wandb\\]"):
        run_logs.open_run_logs(cfg, str(tmp_path), 0, {})
    assert len(closed) == 1 and isinstance(closed[0], run_logs.TensorBoardLog)
