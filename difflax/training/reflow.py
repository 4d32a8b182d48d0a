"""Reflow (Liu et al. 2023, Sec. 2.3; rfpp Sec. 2 and 4): (noise, sample) pairs from a teacher's
probability-flow ODE, written to disk in chunks, and batches of them for training the
2-rectified flow with the training loop.

    out_dir/
      pairs.json            what the pairs are (count, chunk size, shape, seed, teacher, sampler)
      chunk_00000.npz       noise z (n, ...), samples x (n, ...), labels (n,), for rows
      chunk_00001.npz       [i * chunk_size, (i + 1) * chunk_size) of the whole set
      ...

Chunk i's noise and labels depend only on (seed, i), each chunk is written to a temporary
file and renamed into place, and chunks already on disk are skipped: a run killed at any
point (SIGKILL included) and started again on the same directory finishes with the same
files as an uninterrupted one (tested). The sampling batch is sharded over the devices of the
mesh (difflax.training.parallel); on several processes, process 0 writes.

Training (rfpp Sec. 4, "initialising with a pre-trained diffusion model"): the 2-rectified
flow is the teacher's own network used as a velocity (`velocity_from_denoiser`), its
parameters start at the teacher's (`train(..., init_params_fn=lambda: teacher_params)`), and
the loss is `get_rectified_flow_loss_fn` over `pair_batches`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from difflax import schedules
from difflax.chunks import chunk_path, open_chunks, read_chunks, write_chunk
from difflax.data import index_batches
from difflax.samplers import make_grid, make_solver, solve
from difflax.samplers.few_step import rf_grid, rf_schedule
from difflax.training.parallel import (batch_sharded, host_to_global, make_mesh, pad_to_mesh,
                                       replicated)

# model_fn(params, x (B, ...), t (B,), labels (B,) int) -> prediction
ModelFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]
# sample_fn(params, noise (B, ...), labels (B,)) -> samples (B, ...)
PairSampleFn = Callable[[object, jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------
# Sampling, sharded over the mesh.


def get_sharded_sample_fn(model_fn: ModelFn, *, schedule, sampler: str, steps: int | None = None,
                          grid=None, prediction: str = "eps", mesh=None, **options):
    """(fn(params, noise, labels) -> samples, nfe) for any sampler in `difflax.SAMPLERS`.

    Runs `difflax.samplers.solve` from x_T = sigma(t_max) noise under one `jax.jit`, the batch
    split over `mesh` (padded to a multiple of its size); params are replicated. Compiled
    once per batch size.
    """
    mesh = mesh or make_mesh()
    g = make_grid(schedule, sampler, steps, grid)
    solver, nfe = make_solver(schedule, sampler, g, prediction=prediction, **options)

    def run(params, noise, labels, n):
        fn = lambda x, t: model_fn(params, x, t, labels)
        out = solve(fn, noise, schedule=schedule, solver=solver, grid=g, prediction=prediction)
        return out[:n]

    # The output is replicated: every process holds the whole batch (multi-host pairs).
    jitted = jax.jit(run, static_argnums=3, out_shardings=replicated(mesh),
                     in_shardings=(replicated(mesh), batch_sharded(mesh), batch_sharded(mesh)))

    def fn(params, noise, labels):
        padded = pad_to_mesh((noise, np.asarray(labels, np.int32)), mesh)
        return jitted(params, *host_to_global(padded, batch_sharded(mesh)), noise.shape[0])

    return fn, nfe


def denoiser_model_fn(denoiser, *, rectified_flow: bool = False) -> ModelFn:
    """model_fn of a Flax EDM denoiser D(x; sigma): an x0-prediction in EDM time (sigma), or with
    `rectified_flow` in rectified-flow time t, x0 = D(x_t / (1 - t); t / (1 - t)) (the same
    field as `velocity_from_denoiser`, expressed as a data prediction)."""
    label_dim = denoiser.net.label_dim if hasattr(denoiser, "net") else 0

    def model_fn(params, x, t, labels):
        labels = labels if label_dim else None
        if not rectified_flow:
            return denoiser.apply({"params": params}, x, t, labels)
        tb = t.reshape((-1,) + (1,) * (x.ndim - 1))
        return denoiser.apply({"params": params}, x / (1 - tb), t / (1 - t), labels)

    return model_fn


def get_teacher_sample_fn(denoiser, *, sampler: str = "edm_heun", steps: int = 18,
                          sigma_min: float = 0.002, sigma_max: float = 80.0, mesh=None,
                          **options):
    """(fn(params, noise, labels) -> samples, nfe): the teacher's PF-ODE on the EDM schedule."""
    return get_sharded_sample_fn(denoiser_model_fn(denoiser),
                                 schedule=schedules.edm(sigma_min, sigma_max), sampler=sampler,
                                 steps=steps, prediction="x0", mesh=mesh, **options)


def get_rectified_flow_sample_fn(denoiser, *, sampler: str = "rf_euler", steps: int = 1,
                                 t_steps=None, mesh=None):
    """(fn(params, noise, labels) -> samples, nfe) of a (2-)rectified flow whose network is an
    EDM denoiser (`velocity_from_denoiser`): rf_euler, rf_heun or rf_renoise on
    `rf_grid(steps)`, or on rfpp's custom grid `rf_grid(t_steps=t_steps)` if given."""
    grid = rf_grid(steps) if t_steps is None else rf_grid(t_steps=t_steps)
    return get_sharded_sample_fn(denoiser_model_fn(denoiser, rectified_flow=True),
                                 schedule=rf_schedule(), sampler=sampler, grid=grid,
                                 prediction="x0", mesh=mesh)


# ----------------------------------------------------------------------------
# Pairs on disk.


def generate_pairs(sample_fn: PairSampleFn, params, out_dir: str, *, num_pairs: int,
                   chunk_size: int, shape: tuple[int, ...], num_classes: int = 0, seed: int = 0,
                   info: dict | None = None, progress: bool = True,
                   clip: bool = False) -> list[str]:
    """Writes `num_pairs` (noise, teacher sample) pairs to `out_dir` in chunks; returns paths.

    sample_fn(params, noise (chunk_size, *shape), labels (chunk_size,)) -> samples, e.g. from
    `get_teacher_sample_fn`. Chunk i draws noise ~ N(0, I) and labels uniform in
    [0, num_classes) (zeros if 0) from fold_in(key(seed), i); the last chunk is truncated.
    `info` (teacher, sampler, ...) is recorded in pairs.json; resuming with a different
    description is an error. `clip=True` stores the samples clipped to [-1, 1], as rfpp
    stores its teacher's images (`generate.py --save_data` writes 8-bit PNGs; the 8-bit
    rounding is not reproduced); recorded in pairs.json when set.
    """
    meta = dict(num_pairs=num_pairs, chunk_size=chunk_size, shape=list(shape),
                num_classes=num_classes, seed=seed, **({"clip": True} if clip else {}),
                **(info or {}))
    num_chunks = -(-num_pairs // chunk_size)
    todo = open_chunks(out_dir, "pairs", meta, num_chunks)
    root = jax.random.key(seed)
    quiet = not (progress and jax.process_index() == 0)
    for i in tqdm(todo, unit="chunk", desc="reflow pairs", disable=quiet):
        k_noise, k_label = jax.random.split(jax.random.fold_in(root, i))
        noise = jax.random.normal(k_noise, (chunk_size, *shape), jnp.float32)
        labels = (jax.random.randint(k_label, (chunk_size,), 0, num_classes) if num_classes
                  else jnp.zeros((chunk_size,), jnp.int32))
        samples = sample_fn(params, noise, labels)
        samples = jnp.clip(samples, -1.0, 1.0) if clip else samples
        n = min(chunk_size, num_pairs - i * chunk_size)
        write_chunk(out_dir, i, noise=np.asarray(noise)[:n], samples=np.asarray(samples)[:n],
                    labels=np.asarray(labels)[:n].astype(np.int32))
    return [chunk_path(out_dir, i) for i in range(num_chunks)]


def load_pairs(out_dir: str) -> dict[str, np.ndarray]:
    """All pairs of `out_dir`: {"noise", "samples" (N, ...), "labels" (N,)}, without "labels"
    for pairs made with num_classes = 0 (an unconditional teacher); every chunk must be
    present (run `generate_pairs` again to finish an interrupted set)."""
    meta, pairs = read_chunks(out_dir, "pairs", "num_pairs", ("noise", "samples", "labels"),
                              "generate_pairs")
    if not meta["num_classes"]:
        del pairs["labels"]
    return pairs


def pair_batches(pairs: dict[str, np.ndarray], batch_size: int, *, seed: int = 0,
                 start_step: int = 0, process_index: int | None = None,
                 process_count: int | None = None):
    """Infinite iterator of this process's rows of (samples x, noise z, labels) batches;
    labels None for pairs without labels (an unconditional teacher's).

    Batch i depends only on (seed, i): the same epoch-wise permutation as
    `difflax.data.batch_iterator`, so starting at `start_step` resumes a run exactly.
    """
    for idx in index_batches(len(pairs["noise"]), batch_size, seed=seed, start_step=start_step,
                             process_index=process_index, process_count=process_count):
        labels = pairs["labels"][idx] if "labels" in pairs else None
        yield pairs["samples"][idx], pairs["noise"][idx], labels
