"""A training run's directory: its config, its model, its EMA weights, and sampling from them.

`load_run` also takes an exported testbed folder or a shipped testbed's name
(`difflax.testbeds`), so that every experiment's `--workdir` accepts any of the three.

    workdir/config.json     the resolved config of the run (written by `difflax train`)
    workdir/checkpoints/    Orbax checkpoints of the TrainState (difflax.training.loop)
    workdir/samples/        PNG grids and .npz of samples (`difflax sample`)
"""
from __future__ import annotations

import json
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from difflax import configs, data, samplers, schedules, testbeds
from difflax.mesh import make_mesh
from difflax.samplers import denoiser_model, denoiser_run_fn, keyed_sample_fn
from difflax.training import (abstract_train_state, get_init_params_fn, make_checkpoint_manager,
                              make_optimizer, restore_checkpoint)


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes config.json; a workdir that holds a run of another model is an error (a model
    key the old config.json lacks counts as its default, `configs.model_defaults`).

    Every process checks; process 0 writes, atomically (the others may be reading it)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        new = json.loads(config.to_json())
        # a key the old run lacks was added to difflax since: the run was built with its default
        old["model"] = {**configs.model_defaults(config), **old["model"]}
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


def load_run(source: str, mesh=None, step: int | None = None):
    """(config, denoiser, ema_params) of a model, from any of three sources (a SiT run's
    directory gives its `difflax.models.SiT` in place of the denoiser):

    - a training run's directory (``config.json`` + ``checkpoints/``): its newest checkpoint;
    - an exported testbed folder (``config.json`` + ``ema_params.safetensors``, written by
      ``difflax export``);
    - the name of a shipped testbed (``difflax.testbeds.SHIPPED``, e.g. ``"mnist_edm"``).

    A name that is none of these is an error listing the shipped testbeds. `step`: a training
    run's checkpoint of that step instead of the newest."""
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "checkpoints")):
        return _load_checkpoint(source, mesh, step)
    if step is not None:
        raise ValueError(f"step={step}: only a training run's directory has checkpoints by "
                         f"step; {source} is an exported or shipped testbed")
    if os.path.isdir(source) and not os.path.exists(os.path.join(source, testbeds.WEIGHTS)):
        load_config(source)  # a run with no config.json: the error says how to train one
        raise FileNotFoundError(f"{source} has no checkpoint yet; train first")
    return testbeds.load_testbed(source)


def _load_checkpoint(workdir, mesh, step):
    config = load_config(workdir)
    denoiser = configs.model_from_config(config)
    mesh = mesh or make_mesh()
    init = get_init_params_fn(denoiser, jax.random.key(0))
    tx = make_optimizer(configs.train_config(config))
    manager = make_checkpoint_manager(os.path.join(workdir, "checkpoints"), async_save=False)
    state = restore_checkpoint(manager, abstract_train_state(init, tx, mesh), step)
    manager.close()
    if state is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint yet; train first")
    return config, denoiser, state.ema_params


def get_sample_fn(denoiser, *, sampler: str, steps: int | None = None, sigma_min: float,
                  sigma_max: float, mesh=None, plan=None, schedule=None, grid=None):
    """Returns (fn(params, key, labels) -> images (B, R, R, C) in [-1, 1], nfe), sharded over `mesh`.

    The noise is N(0, I) from `key` (the same images on any number of devices or processes);
    the batch is split over the mesh and the result replicated, so that every process of a
    multi-host run holds all images (`difflax.samplers.get_sample_fn` with a mesh).

    Compiled once per batch size and reused for any parameters (e.g. the EMA weights at
    each sampling step of a training run). The denoiser D(x; sigma) is an x0-prediction on
    the EDM schedule (time = sigma) from sigma_max to sigma_min. `sampler`: a name, its order
    appended where it has one ("deis_tab3"). `labels`: (B,) int class labels (ignored by an
    unconditional model). `plan`: a `difflax.accel.FeaturePlan` to sample with the UNet's
    features reused (the returned nfe still counts model calls as the plain sampler does;
    `difflax.accel.plan_cost` says which of them are partial).

    `schedule` (then sigma_min / sigma_max are not used): sample on another schedule, e.g.
    Stable Diffusion's `vp_discrete` with DDIM's uniform timesteps as the explicit `grid`
    (instead of `steps`), the same model re-expressed in its time (`edm_model_on`).
    """
    net = denoiser.net
    if plan is None:
        model = denoiser_model(denoiser)
    else:
        model = lambda params, labels, scales: denoiser_run_fn(
            denoiser, {"params": params}, labels, skip_scales=scales)
    if schedule is None:
        schedule = schedules.edm(sigma_min, sigma_max)
    elif not isinstance(schedule, schedules.EDM):
        model = lambda params, labels, scales, edm=model: edm_model_on(
            edm(params, labels, scales), schedule)
    sample, nfe = samplers.get_sample_fn(
        model, schedule=schedule, sampler=sampler, steps=None if grid is not None else steps,
        grid=grid, prediction="x0", mesh=mesh or make_mesh(), plan=plan, graph=net, clip=True)
    return keyed_sample_fn(sample, (net.img_resolution, net.img_resolution, net.in_channels)), nfe


def edm_model_on(model_fn, schedule):
    """An x0-prediction in EDM time, model_fn(x, sigma, **kw), as a model in `schedule`'s time.

    A state x_t = alpha(t) x_0 + sigma(t) eps of any schedule is x_t / alpha(t) = x_0 +
    rho(t) eps in EDM's units (rho = sigma / alpha, Karras et al. 2022 Sec. 2 and eq. 4's
    scaling s(t)), and E[x_0 | x_t] is the same prediction on both, so
    fn(x, t, **kw) = model_fn(x / alpha(t), rho(t), **kw) with x (B, ...) and t (B,)
    (x may be None for a feature-cache call that reads no input; `**kw` and the output, D or
    (D, features), pass through)."""

    def fn(x, t, **kwargs):
        alpha, rho = schedule.alpha(t), schedule.rho(t)
        if x is not None:
            x = x / jnp.reshape(alpha, jnp.shape(alpha) + (1,) * (x.ndim - jnp.ndim(alpha)))
        return model_fn(x, rho, **kwargs)

    return fn


def labelled_sample_fn(sample, params, label_dim: int):
    """A `get_sample_fn` sampler as the metrics' SampleFn: (key, n) -> (images, labels), the
    labels drawn uniformly from the key."""

    def sample_fn(key, batch_size):
        labels = jax.random.randint(jax.random.fold_in(key, 1), (batch_size,), 0, max(label_dim, 1))
        return sample(params, key, labels), labels

    return sample_fn


def paired_sample_fn(samplers, label_dim: int):
    """K samplers on the same noise and labels as one SampleFn for
    `difflax.metrics.evaluate_samples(..., settings=K, baseline=...)`:
    (key, n) -> (images (K, n, R, R, C), labels (n,)).

    `samplers`: K (sample, params) pairs, `sample` a `get_sample_fn` sampler (e.g. the plain
    model and the same sampler with a feature-reuse plan, or a teacher and its students);
    each is called with the same key, so sample i of every method starts from the same noise
    and asks for the same class (labels as in `labelled_sample_fn`)."""
    fns = [labelled_sample_fn(sample, params, label_dim) for sample, params in samplers]

    def sample_fn(key, batch_size):
        outs = [fn(key, batch_size) for fn in fns]
        return jnp.stack([images for images, _ in outs]), outs[0][1]

    return sample_fn


class RunKind(NamedTuple):
    """What `difflax train | sample | evaluate` do differently for one kind of run
    (`configs.model_kind`): `UNET_RUN` here, `difflax.latent_runs.SIT_RUN` for SiT / GMem.

    Attributes:
      training_fns: (config, model, train_config) -> (make_batches(start_step),
        get_loss_fn(model) -> loss_fn, or None for the EDM loss), as `difflax.training.train`
        takes them (it builds the loss from the model in `train.compute_dtype`).
      default_sampler: config -> the sampler name of its `sample` section.
      sample_fn: (config, model, sampler, steps, vae folder or None) -> (sample, nfe).
      draw: (model, sample, params, num, key) -> (images (num, H, W, C) in [-1, 1], labels or
        None, {name: array} to save beside them).
      grid_columns: model -> columns of a sample grid (0: a square grid).
      evaluation_data: (config, model, params) -> (dataset the samples are compared with, its
        resolution, sample -> the metrics' SampleFn).
    """

    training_fns: Callable
    default_sampler: Callable
    sample_fn: Callable
    draw: Callable
    grid_columns: Callable
    evaluation_data: Callable


def _unet_batches(config, model, cfg):
    d = config.data
    return (lambda start: data.batch_iterator(
        d.name, cfg.batch_size, seed=cfg.seed, start_step=start, random_flip=d.random_flip,
        resolution=d.resolution or None, data_dir=d.data_dir or None,
        labels=bool(model.label_dim))), None


def _unet_sample_fn(config, denoiser, sampler, steps, vae):
    s = config.sample
    return get_sample_fn(denoiser, sampler=sampler, steps=steps, sigma_min=s.sigma_min,
                         sigma_max=s.sigma_max)


def _unet_draw(denoiser, sample, params, num, key):
    labels = np.arange(num) % max(denoiser.net.label_dim, 1)  # one class per grid column
    return sample(params, key, labels), labels, {}


# a UNet run of images: its dataset's batches, the EDM loss, get_sample_fn's samplers
UNET_RUN = RunKind(
    training_fns=_unet_batches,
    default_sampler=lambda config: config.sample.sampler,
    sample_fn=_unet_sample_fn,
    draw=_unet_draw,
    grid_columns=lambda denoiser: denoiser.net.label_dim,
    evaluation_data=lambda config, denoiser, params: (
        config.data.name, denoiser.net.img_resolution,
        lambda sample: labelled_sample_fn(sample, params, denoiser.net.label_dim)))
