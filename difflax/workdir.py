"""A training run's directory: its config, its model, its EMA weights, and sampling from them.

    workdir/config.json     the resolved config of the run (written by `difflax train`)
    workdir/checkpoints/    Orbax checkpoints of the TrainState (difflax.training.loop)
    workdir/samples/        PNG grids and .npz of samples (`difflax sample`)
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from difflax import configs, schedules
from difflax.accel.feature_reuse import denoiser_run_fn, sample_with_plan
from difflax.samplers import make_grid, make_solver, sample
from difflax.training import (abstract_train_state, get_init_params_fn, make_checkpoint_manager,
                              make_mesh, make_optimizer, replicated, restore_checkpoint)
from difflax.training.parallel import batch_sharded, host_to_global, pad_to_mesh


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes config.json; a workdir that holds a run of another model is an error.

    Every process checks; process 0 writes, atomically (the others may be reading it)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        new = json.loads(config.to_json())
        diff = [f"{section}.{k}: {old[section].get(k)!r} -> {v!r}"
                for section in ("model", "data") for k, v in new[section].items()
                if _plain(old[section].get(k)) != _plain(v)]
        if diff:
            raise ValueError(f"workdir {workdir} holds a run of another model or dataset "
                             f"({'; '.join(diff[:3])}); use a new --workdir")
    if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            f.write(config.to_json(indent=2))
        os.replace(path + ".tmp", path)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} holds no run (no config.json): train one first with "
                                "`difflax train --config configs/digits_edm.py --workdir DIR`")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, mesh=None):
    """(config, denoiser, ema_params) of the newest checkpoint in `workdir`."""
    config = load_config(workdir)
    denoiser = configs.denoiser_from_config(config)
    mesh = mesh or make_mesh()
    init = get_init_params_fn(denoiser, jax.random.key(0))
    tx = make_optimizer(configs.train_config(config))
    manager = make_checkpoint_manager(os.path.join(workdir, "checkpoints"), async_save=False)
    state = restore_checkpoint(manager, abstract_train_state(init, tx, mesh))
    manager.close()
    if state is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint yet; train first")
    return config, denoiser, state.ema_params


def get_sample_fn(denoiser, *, sampler: str, steps: int, sigma_min: float, sigma_max: float,
                  mesh=None, plan=None):
    """Returns (fn(params, key, labels) -> images (B, R, R, C) in [-1, 1], nfe), sharded over `mesh`.

    The noise is N(0, I) from `key` (the same images on any number of devices or processes);
    the batch is split over the mesh and the result replicated, so that every process of a
    multi-host run holds all images.

    Compiled once per batch size and reused for any parameters (e.g. the EMA weights at
    each sampling step of a training run). The denoiser D(x; sigma) is an x0-prediction on
    the EDM schedule (time = sigma). `labels`: (B,) int class labels (ignored by an
    unconditional model). `plan`: a `difflax.accel.FeaturePlan` to sample with the UNet's
    features reused (the returned nfe still counts model calls as the plain sampler does;
    `difflax.accel.plan_cost` says which of them are partial).
    """
    mesh = mesh or make_mesh()
    net = denoiser.net
    schedule = schedules.edm(sigma_min, sigma_max)
    name, options = configs.sampler_options(sampler)
    _, nfe = make_solver(schedule, name, make_grid(schedule, name, steps), prediction="x0",
                         **options)  # validates the sampler and its options, counts NFE

    shape = (net.img_resolution, net.img_resolution, net.in_channels)

    def run(params, key, labels, n):
        noise = jax.random.normal(key, (n, *shape))
        noise = jnp.pad(noise, ((0, labels.shape[0] - n),) + ((0, 0),) * len(shape))
        noise = jax.lax.with_sharding_constraint(noise, batch_sharded(mesh))
        labels = labels if net.label_dim else None
        if plan is not None:
            out = sample_with_plan(denoiser_run_fn(denoiser, {"params": params}, labels), noise,
                                   plan=plan, config=net, schedule=schedule, sampler=name,
                                   steps=steps, prediction="x0", **options)[0]
        else:
            model_fn = lambda x, t: denoiser.apply({"params": params}, x, t, labels)
            out = sample(model_fn, noise, schedule=schedule, sampler=name, steps=steps,
                         prediction="x0", **options)[0]
        return jnp.clip(out[:n], -1, 1)

    # The output is replicated: every process holds all samples (multi-host evaluation).
    jitted = jax.jit(run, static_argnums=3, out_shardings=replicated(mesh),
                     in_shardings=(replicated(mesh), replicated(mesh), batch_sharded(mesh)))

    def fn(params, key, labels):
        labels = np.asarray(labels, np.int32)
        (padded,) = pad_to_mesh((labels,), mesh)
        return jitted(params, host_to_global(key, replicated(mesh)),
                      host_to_global(padded, batch_sharded(mesh)), len(labels))

    return fn, nfe


def labelled_sample_fn(sample, params, label_dim: int):
    """A `get_sample_fn` sampler as the metrics' SampleFn: (key, n) -> (images, labels), the
    labels drawn uniformly from the key."""

    def sample_fn(key, batch_size):
        labels = jax.random.randint(jax.random.fold_in(key, 1), (batch_size,), 0, max(label_dim, 1))
        return sample(params, key, labels), labels

    return sample_fn
