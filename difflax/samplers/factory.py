"""The one sampling factory: a model, a schedule, a sampler and a grid in, a sampler function out.

Every caller builds its sampler here: `difflax.workdir.get_sample_fn` (the CLI), Reflow's
teacher and student (`difflax.rfpp.reflow`), Skip-Tuning sweeps
(`difflax.accel.skip_tuning.get_sweep_fn`), the experiments and the notebooks. The factory
parses the sampler's name ("deis_tab3"), builds its grid and diffrax solver once on the host
(counting NFE), and returns either the pure function (to `jit` or `vmap`: a sweep over skip
settings is `jax.vmap` over its `skip_scales` argument) or, given a mesh, that function
jitted with the batch padded to a multiple of the mesh and split over it.

A *model* here is a builder, `model(params, labels, skip_scales) -> model_fn(x, t)`: it
binds the parameters, the (B,) class labels and the skip scales, and returns the network as
a function of the state x (B, ...) and the times t (B,) in the schedule's own time. With a
feature plan it returns the network with its feature cache instead (a RunFn, e.g.
`difflax.samplers.cached.denoiser_run_fn`). `denoiser_model` is the builder of an EDM denoiser.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from difflax.mesh import batch_sharded, host_to_global, pad_to_mesh, replicated
from difflax.samplers.cached import sample_with_plan
from difflax.samplers.solve import make_grid, make_solver, solve, split_sampler_name

# model(params, labels (B,) | None, skip_scales | None) -> model_fn(x (B, ...), t (B,))
ModelBuilder = Callable[[object, object, object], Callable]
# sample_fn(params, noise (B, ...), labels (B,) | None = None, skip_scales = None) -> (B, ...)
SampleFn = Callable[..., jax.Array]


def denoiser_model(denoiser, *, rectified_flow: bool = False,
                   time_skip_scales: Callable | None = None) -> ModelBuilder:
    """The builder of a Flax EDM denoiser D(x; sigma, labels, skip_scales) with parameters
    `params`: an x0-prediction in EDM time (t = sigma), or with `rectified_flow` in
    rectified-flow time t, x0 = D(x_t / (1 - t); t / (1 - t)) (the field of
    `difflax.rfpp.velocity_from_denoiser`, expressed as a data prediction).

    Labels reach the network only if it is class-conditional (`denoiser.net.label_dim`).
    `time_skip_scales(skip_scales, t)`: the scales a model call at times t (B,) uses
    (Skip-Tuning Sec. 5.2, `difflax.accel.time_dependent_skip_scales`); by default the same
    at every call.
    """
    label_dim = getattr(getattr(denoiser, "net", None), "label_dim", 0)

    def model(params, labels, skip_scales):
        labels = labels if label_dim else None

        def model_fn(x, t):
            kwargs = {}
            if skip_scales is not None:
                at_t = skip_scales if time_skip_scales is None else time_skip_scales(skip_scales, t)
                kwargs["skip_scales"] = at_t
            if not rectified_flow:
                return denoiser.apply({"params": params}, x, t, labels, **kwargs)
            tb = t.reshape((-1,) + (1,) * (x.ndim - 1))
            return denoiser.apply({"params": params}, x / (1 - tb), t / (1 - t), labels, **kwargs)

        return model_fn

    return model


def get_sample_fn(model: ModelBuilder, *, schedule, sampler: str, steps: int | None = None,
                  grid=None, prediction: str = "eps", mesh=None, plan=None, graph=None,
                  clip: bool = False, key=None, **options) -> tuple[SampleFn, int]:
    """Returns (fn, nfe): fn(params, noise, labels=None, skip_scales=None) -> samples.

    Args:
      model: a builder (module docstring), e.g. `denoiser_model(denoiser)`.
      schedule: a `difflax.schedules` schedule; the samples start at x_T = sigma(T) noise.
      sampler: a name in `difflax.SAMPLERS`, or one with its order appended ("deis_tab3").
      steps / grid: intervals on the sampler's default grid, or an explicit decreasing grid.
      prediction: what model_fn predicts ("eps", "x0", "v", "velocity", "score").
      mesh: None gives the pure function (jit or vmap it yourself); a mesh gives fn jitted
        (compiled once per batch size), the batch padded to a multiple of the mesh size and
        split over it, params and skip scales replicated, the samples replicated (every
        process of a multi-host run holds them all). noise and labels are host values that
        every process holds alike.
      plan: a `difflax.samplers.FeaturePlan` (Faster Diffusion's, DeepCache's, A-SDM's: see
        difflax.accel); `model` then builds the network with its feature cache and `graph` is
        the network's config naming the plan's nodes. NFE still counts model calls as the
        plain sampler does (`difflax.samplers.plan_cost` says which are partial).
      clip: clip the samples to [-1, 1] (images).
      key: for stochastic samplers (edm_heun with s_churn > 0, euler_maruyama).
      **options: the sampler's own (order, lower_order_final, s_churn, ...).

    fn takes noise (B, ...) standard normal, labels (B,) int or None, skip_scales a pytree
    (None: the model's own); returns (B, ...).
    """
    name, options = split_sampler_name(sampler, options)
    g = make_grid(schedule, name, steps, grid)
    solver, nfe = make_solver(schedule, name, g, prediction=prediction, key=key, **options)

    def run(params, noise, labels=None, skip_scales=None):
        model_fn = model(params, labels, skip_scales)
        if plan is None:
            out = solve(model_fn, noise, schedule=schedule, solver=solver, grid=g,
                        prediction=prediction)
        else:
            out = sample_with_plan(model_fn, noise, plan=plan, config=graph, schedule=schedule,
                                   sampler=name, steps=steps, grid=grid, prediction=prediction,
                                   key=key, **options)[0]
        return jnp.clip(out, -1.0, 1.0) if clip else out

    return (run if mesh is None else shard_sample_fn(run, mesh)), nfe


def keyed_sample_fn(sample_fn: SampleFn, shape: tuple[int, ...]) -> Callable:
    """fn(params, key, labels, skip_scales=None) -> samples: `sample_fn` on noise N(0, I) of
    shape (len(labels), *shape) drawn from `key`, the same on any number of devices."""

    def fn(params, key, labels, skip_scales=None):
        return sample_fn(params, jax.random.normal(key, (len(labels), *shape)), labels,
                         skip_scales)

    return fn


def shard_sample_fn(run: SampleFn, mesh) -> SampleFn:
    """`run` jitted over `mesh`: the batch padded with zeros to a multiple of the mesh size
    and split along "data", params and skip scales replicated, the output replicated and cut
    back to the batch size."""

    def cut(params, noise, labels, skip_scales, n):
        return run(params, noise, labels, skip_scales)[:n]

    rows, repl = batch_sharded(mesh), replicated(mesh)
    jitted = jax.jit(cut, static_argnums=4, out_shardings=repl,
                     in_shardings=(repl, rows, rows, repl))

    def fn(params, noise, labels=None, skip_scales=None):
        n = noise.shape[0]
        if labels is None:
            noise, labels = host_to_global(pad_to_mesh((noise,), mesh)[0], rows), None
        else:
            noise, labels = host_to_global(pad_to_mesh((noise, np.asarray(labels, np.int32)),
                                                       mesh), rows)
        return jitted(params, noise, labels, host_to_global(skip_scales, repl), n)

    return fn
