"""GMem's training (GMem Sec. 3): a SiT conditioned on the memory snippet of each training
image, fitted with SiT's interpolant loss.

The snippet is the network's second condition (`difflax.models.SiT`, `snippet_dim` > 0) and
the loss reads it from the batch (`difflax.training.interpolant_loss.get_interpolant_loss_fn`:
batches (images, labels, snippets)); both are generic conditioning, so the same loop trains the
class-conditional SiT baseline (snippets None) and GMem (snippets = `bank.snippets_of(i)` of
training image i, looked up once before training).

Step s (1-based) draws `batch_size` training rows with replacement from
`numpy.random.default_rng((seed, s))`: batch s depends only on (seed, s).
"""
from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import numpy as np

from difflax.mesh import shard_batch
from difflax.models.sit import init_sit
from difflax.training.interpolant_loss import get_interpolant_loss_fn
from difflax.training.parallel import get_train_step_fn, init_train_state
from difflax.training.state import (TrainConfig, TrainState, ema_decay, learning_rate_schedule,
                                    make_optimizer)

# on_eval(step, state, losses (floats, one per step so far), train_seconds)
EvalFn = Callable[[int, TrainState, list, float], None]


def batch_rows(seed: int, step: int, num_rows: int, batch_size: int) -> np.ndarray:
    """(batch_size,) row indices of training step `step`, drawn with replacement."""
    return np.random.default_rng((seed, step)).integers(0, num_rows, batch_size)


def train_sit(model, tcfg: TrainConfig, mesh, *, images: np.ndarray, labels: np.ndarray,
              snippets: np.ndarray | None = None, interpolant: str = "linear",
              prediction: str = "velocity", loss_weight: str | None = None,
              eval_at=(), on_eval: EvalFn | None = None) -> TrainState:
    """Trains a `difflax.models.SiT` from SiT's initialisation (`init_sit`, key tcfg.seed) for
    tcfg.steps data-parallel steps over `mesh`; returns the final TrainState.

    images (N, H, W, C) in [-1, 1], labels (N,) int (used if the SiT has num_classes > 0),
    snippets (N, D) the memory snippet of each image (GMem; needed if the SiT has
    snippet_dim > 0). The loss is SiT's (`interpolant`, `prediction`, `loss_weight`); the
    optimiser, schedule and EMA are tcfg's. on_eval(step, state, losses, train_seconds) runs
    after every step in `eval_at` and after the last; train_seconds counts the steps only.
    """
    tx = make_optimizer(tcfg)
    loss_fn = get_interpolant_loss_fn(model, interpolant=interpolant, prediction=prediction,
                                      loss_weight=loss_weight)
    state = init_train_state(lambda: init_sit(model.config, jax.random.key(tcfg.seed))["params"],
                             tx, mesh)
    step_fn = get_train_step_fn(loss_fn, tx, functools.partial(ema_decay, tcfg), mesh,
                                lr_fn=learning_rate_schedule(tcfg))
    key = jax.random.key(tcfg.seed + 1)
    losses, train_seconds = [], 0.0
    for step in range(1, tcfg.steps + 1):
        idx = batch_rows(tcfg.seed, step, len(images), tcfg.batch_size)
        batch = (images[idx], labels[idx]) + (() if snippets is None else (snippets[idx],))
        tic = time.perf_counter()
        state, metrics = step_fn(state, shard_batch(batch, mesh), key)
        losses.append(metrics["loss"])
        if step in eval_at or step == tcfg.steps:
            losses = [float(v) for v in losses]
            train_seconds += time.perf_counter() - tic
            if on_eval is not None:
                on_eval(step, state, losses, train_seconds)
        else:
            train_seconds += time.perf_counter() - tic
    return state
