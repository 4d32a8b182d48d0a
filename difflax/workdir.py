"""A training run's directory: its config, its model, its EMA weights, and sampling from them.

    workdir/config.json     the resolved config of the run (written by `difflax train`)
    workdir/checkpoints/    Orbax checkpoints of the TrainState (difflax.training.loop)
    workdir/samples/        PNG grids and .npz of samples (`difflax sample`)
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections

from difflax import configs, samplers, schedules
from difflax.mesh import make_mesh
from difflax.samplers import denoiser_model, denoiser_run_fn, keyed_sample_fn
from difflax.training import (abstract_train_state, get_init_params_fn, make_checkpoint_manager,
                              make_optimizer, restore_checkpoint)


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
    multi-host run holds all images (`difflax.samplers.get_sample_fn` with a mesh).

    Compiled once per batch size and reused for any parameters (e.g. the EMA weights at
    each sampling step of a training run). The denoiser D(x; sigma) is an x0-prediction on
    the EDM schedule (time = sigma). `sampler`: a name, its order appended where it has one
    ("deis_tab3"). `labels`: (B,) int class labels (ignored by an unconditional model).
    `plan`: a `difflax.samplers.FeaturePlan` to sample with the UNet's features reused (the
    returned nfe still counts model calls as the plain sampler does;
    `difflax.samplers.plan_cost` says which of them are partial).
    """
    net = denoiser.net
    if plan is None:
        model = denoiser_model(denoiser)
    else:
        model = lambda params, labels, scales: denoiser_run_fn(
            denoiser, {"params": params}, labels, skip_scales=scales)
    sample, nfe = samplers.get_sample_fn(
        model, schedule=schedules.edm(sigma_min, sigma_max), sampler=sampler, steps=steps,
        prediction="x0", mesh=mesh or make_mesh(), plan=plan, graph=net, clip=True)
    return keyed_sample_fn(sample, (net.img_resolution, net.img_resolution, net.in_channels)), nfe


def labelled_sample_fn(sample, params, label_dim: int):
    """A `get_sample_fn` sampler as the metrics' SampleFn: (key, n) -> (images, labels), the
    labels drawn uniformly from the key."""

    def sample_fn(key, batch_size):
        labels = jax.random.randint(jax.random.fold_in(key, 1), (batch_size,), 0, max(label_dim, 1))
        return sample(params, key, labels), labels

    return sample_fn
