"""diffrax glue: the samplers by name, `sample`, the one entry point, and adaptive reference
solutions.

A sampler is a time grid plus a diffrax solver (an update rule whose coefficient tables are
computed on the host); `sample` runs it with `term.solve` (diffeqsolve + StepTo(ts=grid)) on
the probability-flow ODE term. NFE is counted on the host from the sampler's structure (one per
model call) and returned as a Python int.
"""
from __future__ import annotations

import inspect

import diffrax
import jax.numpy as jnp
import numpy as np

from difflax import schedules as sch
from difflax.parameterization import PREDICTIONS
from difflax.samplers import deis, dpm, edm, flow, sde, unipc
from difflax.samplers.term import DiffusionTerm, solve

# name -> factory(schedule, grid, **options) -> (solver, nfe). A literal dict, no registry.
SAMPLERS = {
    "euler": deis.ddim,
    "ddim": deis.ddim,
    "deis_tab": deis.deis_tab,
    "deis_rhoab": deis.deis_rhoab,
    "deis_logrho": deis.deis_logrho,
    "deis_rhork": deis.deis_rhork,
    "ipndm": deis.ipndm,
    "dpm_multistep": dpm.dpm_multistep,
    "dpmpp_2m": dpm.dpmpp_2m,
    "dpmpp_3m": dpm.dpmpp_3m,
    "unipc": unipc.unipc,
    "edm_heun": edm.edm_heun,
    "rf_euler": flow.rf_euler,
    "rf_heun": flow.rf_heun,
    "rf_renoise": flow.rf_renoise,
    "euler_maruyama": sde.euler_maruyama,
}


# Samplers whose order may be written after the name: "deis_tab3", "ipndm4".
ORDER_IN_NAME = ("deis_tab", "deis_rhoab", "ipndm")


def split_sampler_name(name: str, options: dict | None = None) -> tuple[str, dict]:
    """A sampler name with its order folded in -> (name, options): "deis_tab3" ->
    ("deis_tab", {"order": 3}); any other name -> (name, options). The one place such names
    are read; naming the order twice is an error."""
    options = dict(options or {})
    for base in ORDER_IN_NAME:
        if name.startswith(base) and name[len(base):].isdigit():
            if "order" in options:
                raise ValueError(f"sampler {name!r} names its order; do not pass order= too")
            return base, {**options, "order": int(name[len(base):])}
    return name, options


def default_grid_kind(schedule, sampler=None) -> str:
    """"edm" for EDM / VE, "uniform" for rectified flow, DEIS's "quadratic" for VP, except
    "uniform" for iPNDM on VP (DEIS's code runs iPNDM on a grid uniform in t)."""
    if isinstance(schedule, (sch.EDM, sch.VE)):
        return "edm"
    if isinstance(schedule, sch.RectifiedFlow) or sampler == "ipndm":
        return "uniform"
    return "quadratic"


def make_grid(schedule, sampler, steps=None, grid=None, grid_kind=None, **grid_options):
    """The grid `sample` uses: an explicit `grid`, or `steps` intervals of kind `grid_kind`."""
    if (steps is None) == (grid is None):
        raise ValueError("pass exactly one of steps= or grid=")
    if grid is not None:
        return sch.check_grid(schedule, grid)
    kind = grid_kind or default_grid_kind(schedule, sampler)
    final_zero = (sampler == "edm_heun" and schedule.t_zero is not None
                  and schedule.t_min > schedule.t_zero)
    return sch.time_grid(schedule, int(steps), kind, final_zero=final_zero, **grid_options)


def make_solver(schedule, sampler, grid, *, prediction="eps", key=None, **options):
    """(solver, nfe) for a sampler name, with options checked against its signature."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {tuple(SAMPLERS)}")
    factory = SAMPLERS[sampler]
    params = inspect.signature(factory).parameters
    if "key" in params:
        options["key"] = key
    if "prediction" in params:
        options["prediction"] = prediction
    bad = set(options) - set(params) - {"key", "prediction"}
    if bad:
        valid = tuple(p for p in params if p not in ("schedule", "grid", "key", "prediction"))
        raise ValueError(f"{sampler}: unknown options {sorted(bad)}; valid options: {valid}")
    options = {k: v for k, v in options.items() if k in params}
    return factory(schedule, np.asarray(grid, np.float64), **options)


def sample(model_fn, noise, *, schedule, sampler, steps=None, grid=None, prediction="eps",
           key=None, grid_kind=None, kappa=None, **options):
    """Draws samples from x_T = sigma(T) * noise by running `sampler` over a time grid.

    Args:
      model_fn: model_fn(x, t) -> prediction of kind `prediction` ("eps", "x0", "v",
        "velocity", "score"), x (B, ...), t (B,) in the schedule's own time.
      noise: standard normal (B, ...).
      schedule: a `difflax.schedules` schedule.
      sampler: a name in SAMPLERS, or one with its order appended ("deis_tab3").
      steps / grid: number of steps on a grid of kind `grid_kind` (default per schedule,
        `kappa` for the power / edm kinds), or an explicit decreasing grid (concrete array).
      key: for stochastic samplers (edm_heun with s_churn > 0, euler_maruyama).
      **options: the sampler's own (order, method, lower_order_final, s_churn, ...).

    Returns:
      (samples (B, ...), nfe) with nfe a Python int. Works under jax.jit and jax.vmap.
    """
    sampler, options = split_sampler_name(sampler, options)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {tuple(SAMPLERS)}")
    g = make_grid(schedule, sampler, steps, grid, grid_kind,
                  **({} if kappa is None else {"kappa": kappa}))
    solver, nfe = make_solver(schedule, sampler, g, prediction=prediction, key=key, **options)
    return solve(model_fn, noise, schedule=schedule, solver=solver, grid=g,
                 prediction=prediction), nfe


REFERENCE_SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8}


def reference_sample(model_fn, noise, *, schedule, prediction="eps", t_max=None, t_min=None,
                     solver="tsit5", rtol=1e-6, atol=1e-6, max_steps=4096):
    """Adaptive solution of the same probability-flow ODE term from x_T = sigma(T) noise.

    Returns (samples, num_steps), num_steps the adaptive solver's accepted steps (traced).
    """
    if solver not in REFERENCE_SOLVERS:
        raise ValueError(f"unknown reference solver {solver!r}; choose one of "
                         f"{tuple(REFERENCE_SOLVERS)}")
    hi = schedule.t_max if t_max is None else t_max
    lo = schedule.t_min if t_min is None else t_min
    dtype = jnp.asarray(noise).dtype
    x_T = jnp.asarray(float(schedule.sigma(hi)), dtype) * noise
    term = DiffusionTerm(model_fn, schedule, prediction)
    kinks = schedule.breakpoints()  # VP discrete: log alpha is piecewise linear in t
    kinks = kinks[(kinks > lo) & (kinks < hi)]
    controller = diffrax.PIDController(rtol=rtol, atol=atol,
                                       jump_ts=jnp.asarray(kinks, dtype) if len(kinks) else None)
    sol = diffrax.diffeqsolve(
        term, REFERENCE_SOLVERS[solver](), jnp.asarray(hi, dtype), jnp.asarray(lo, dtype), None,
        x_T, stepsize_controller=controller,
        saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
    return sol.ys[0], sol.stats["num_steps"]
