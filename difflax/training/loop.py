"""The training loop: resume, step, log, checkpoint, sample.

    workdir/
      checkpoints/<step>/   Orbax checkpoints of the TrainState (newest `keep_checkpoints`)
      metrics.jsonl         one JSON line per logging step: step, loss, grad_norm, lr,
                            steps_per_sec (averaged over the steps since the last line)
      samples/<step>.png    grids from the optional `sample_fn` callback
      tensorboard/          with `TrainConfig.tensorboard`: TensorBoard event files of the
                            same scalars (as "train/<name>") and grids ("samples")
      wandb/, wandb_id      with `TrainConfig.wandb`: the Weights & Biases run of the same
                            scalars and grids (difflax.training.run_logs)

Starting `train` on a workdir that holds checkpoints continues from the newest one; since
batch i and the step's key depend only on (seed, i), the resumed run ends with the same
parameters as an uninterrupted one. Lines and events logged after that checkpoint by a killed
run are dropped (metrics.jsonl is trimmed; TensorBoard is told to purge them).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from difflax.images import make_grid, save_grid
from difflax.mesh import host_to_global, make_mesh, replicated, shard_batch
from difflax.models.precond import model_signature
from difflax.models.sit import SiT, init_sit
from difflax.training import checkpoint as ckpt
from difflax.training import parallel
from difflax.training.losses import get_edm_loss_fn
from difflax.training.run_logs import open_run_logs
from difflax.training.state import (TrainConfig, TrainState, ema_decay,
                                    learning_rate_schedule, make_optimizer)

# (params, step) -> images (N, H, W, C) in [-1, 1]
SampleFn = Callable[[object, int], jax.Array]


def get_init_params_fn(model, key: jax.Array):
    """Returns init() -> params of a denoiser D(x (B, *input_shape), sigma (B,), labels), the
    shape and class count read from the model (`model_signature`), or of a
    `difflax.models.SiT` (SiT's initialisation, `init_sit`, with its labels and snippets)."""
    if isinstance(model, SiT):
        return lambda: init_sit(model.config, key)["params"]
    input_shape, label_dim = model_signature(model)

    def init():
        x = jnp.zeros((1, *input_shape), jnp.float32)
        labels = jnp.zeros((1, label_dim), jnp.float32) if label_dim > 0 else None
        k_params, k_dropout = jax.random.split(key)
        variables = model.init({"params": k_params, "dropout": k_dropout}, x,
                               jnp.ones((1,), jnp.float32), labels)
        return variables["params"]

    return init


def with_compute_dtype(model, dtype: str):
    """`model` computing in `dtype` (TrainConfig.compute_dtype): the `dtype` field of a
    Denoiser or a SiT; any other model only in float32. bfloat16 needs no loss scaling;
    float16 would (its gradients underflow) and is refused."""
    if dtype == "float32" or getattr(model, "dtype", None) == dtype:
        return model
    if dtype == "float16":
        raise ValueError("train.compute_dtype float16 needs loss scaling, which difflax's "
                         "training does not do; use bfloat16 (same range as float32)")
    if not hasattr(model, "dtype"):
        raise ValueError(f"train.compute_dtype {dtype!r}: {type(model).__name__} has no "
                         "`dtype` field; mixed precision works on difflax.models.Denoiser "
                         "and difflax.models.SiT")
    return model.clone(dtype=dtype)


def _trim_metrics(path: str, last_step: int) -> None:
    """Drops lines logged after `last_step` (by a run killed after its last checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(lines)


def _log(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _summarise(history: list[dict], seconds: float, step: int) -> dict:
    means = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
    return {"step": step, **means, "steps_per_sec": len(history) / max(seconds, 1e-9)}


def _due(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


def train(cfg: TrainConfig, model, make_batches: Callable[[int], Iterator], workdir: str, *,
          get_loss_fn=None,
          sample_fn: SampleFn | None = None, sample_nrow: int = 8, mesh=None,
          progress: bool = True, init_params_fn: Callable[[], object] | None = None,
          run_config: dict | None = None) -> TrainState:
    """Trains `model` (a Flax denoiser, see difflax.models) for cfg.steps optimiser steps.

    make_batches(start_step) -> iterator of this process's numpy (images, labels) rows of
    global batches of cfg.batch_size, batch i depending only on i (e.g.
    `functools.partial(data.batch_iterator, name, B, seed=s)` via start_step=...); labels
    None for an unconditional model; any tuple of arrays that the loss reads (a SiT's
    (latents, labels[, snippets]), `difflax.latents.latent_batches`). The example shape and class count come from the model
    (`model.input_shape`, `model.label_dim`; a batch that does not fit them is an error).
    get_loss_fn(model) -> loss_fn(params, batch, key), default the EDM loss
    (`get_edm_loss_fn`), is given the model in `cfg.compute_dtype` (`with_compute_dtype`,
    applied here only). sample_fn(ema_params, step) -> images in [-1, 1] is called every
    cfg.sample_every steps and written to workdir/samples. init_params_fn() -> params, pure,
    replaces the fresh initialisation (e.g. a teacher's parameters for Reflow). run_config:
    the run's configuration as a dict for W&B (`cfg.wandb`), default {"train": cfg's fields}.
    Returns the final state.
    """
    mesh = make_mesh() if mesh is None else mesh
    model = with_compute_dtype(model, cfg.compute_dtype)
    primary = jax.process_index() == 0
    k_init, k_train = jax.random.split(jax.random.key(cfg.seed))
    tx = make_optimizer(cfg)
    init_params = init_params_fn or get_init_params_fn(model, k_init)
    manager = ckpt.make_checkpoint_manager(os.path.join(workdir, "checkpoints"),
                                           keep=cfg.keep_checkpoints)
    state = ckpt.restore_checkpoint(manager, parallel.abstract_train_state(init_params, tx, mesh))
    if state is None:
        state = parallel.init_train_state(init_params, tx, mesh)
    start = int(jax.device_get(state.step))
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if primary:
        _trim_metrics(metrics_path, start)
    loss_fn = (get_loss_fn or get_edm_loss_fn)(model)
    step_fn = parallel.get_train_step_fn(loss_fn, tx, functools.partial(ema_decay, cfg), mesh,
                                         lr_fn=learning_rate_schedule(cfg))
    key = host_to_global(k_train, replicated(mesh))
    batches = make_batches(start)
    bar = tqdm(total=cfg.steps, initial=start, unit="step", disable=not (progress and primary))
    history, logs = [], []
    try:
        if primary:
            logs = open_run_logs(cfg, workdir, start,
                                 run_config or {"train": dataclasses.asdict(cfg)})
        tick = time.perf_counter()
        for step in range(start + 1, cfg.steps + 1):
            state, metrics = step_fn(state, shard_batch(next(batches), mesh), key)
            history.append(metrics)
            if _due(cfg.log_every, step) or step == cfg.steps:
                record = _summarise(jax.device_get(history), time.perf_counter() - tick, step)
                history, tick = [], time.perf_counter()
                bar.set_postfix(loss=f"{record['loss']:.4f}",
                                steps_s=f"{record['steps_per_sec']:.1f}")
                if primary:
                    _log(metrics_path, record)
                for log in logs:
                    log.scalars(record, step)
            if sample_fn is not None and _due(cfg.sample_every, step):
                images = np.asarray(jax.device_get(sample_fn(state.ema_params, step)))
                if primary:
                    save_grid(os.path.join(workdir, "samples", f"{step:07d}.png"), images,
                              sample_nrow)
                for log in logs:
                    log.image("samples", make_grid(images, sample_nrow), step)
            if _due(cfg.ckpt_every, step) or step == cfg.steps:
                for log in logs:  # what is logged up to a checkpoint is written before it
                    log.flush()
                ckpt.save_checkpoint(manager, state)
            bar.update(1)
    finally:
        bar.close()
        if hasattr(batches, "close"):
            batches.close()
        manager.wait_until_finished()
        manager.close()
        for log in logs:
            log.close()
    return state
