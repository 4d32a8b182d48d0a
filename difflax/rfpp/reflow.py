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
mesh (difflax.mesh); on several processes, process 0 writes.

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
from difflax.mesh import make_mesh
from difflax.samplers import denoiser_model, get_sample_fn
from difflax.rfpp.few_step import rf_grid, rf_schedule

# sample_fn(params, noise (B, ...), labels (B,)) -> samples (B, ...)
PairSampleFn = Callable[[object, jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------
# Teacher and student samplers (`difflax.samplers.get_sample_fn`, sharded over the mesh).


def get_teacher_sample_fn(denoiser, *, sampler: str = "edm_heun", steps: int = 18,
                          sigma_min: float = 0.002, sigma_max: float = 80.0, mesh=None,
                          **options):
    """(fn(params, noise, labels) -> samples, nfe): the teacher's PF-ODE on the EDM schedule,
    not clipped; `sampler` any name of `difflax.SAMPLERS` ("deis_tab" with order=3, or
    "deis_tab3"). The batch is split over `mesh` (default: all devices)."""
    return get_sample_fn(denoiser_model(denoiser), schedule=schedules.edm(sigma_min, sigma_max),
                         sampler=sampler, steps=steps, prediction="x0",
                         mesh=mesh or make_mesh(), **options)


def get_rectified_flow_sample_fn(denoiser, *, sampler: str = "rf_euler", steps: int = 1,
                                 t_steps=None, mesh=None):
    """(fn(params, noise, labels) -> samples, nfe) of a (2-)rectified flow whose network is an
    EDM denoiser (`velocity_from_denoiser`): rf_euler, rf_heun or rf_renoise on
    `rf_grid(steps)`, or on rfpp's custom grid `rf_grid(t_steps=t_steps)` if given."""
    grid = rf_grid(steps) if t_steps is None else rf_grid(t_steps=t_steps)
    return get_sample_fn(denoiser_model(denoiser, rectified_flow=True), schedule=rf_schedule(),
                         sampler=sampler, grid=grid, prediction="x0", mesh=mesh or make_mesh())


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
