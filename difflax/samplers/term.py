"""The probability-flow ODE as a diffrax term that also answers in any parameterisation, the
grid solvers' base class, and `solve`: diffeqsolve + StepTo on a grid, in one place."""
from __future__ import annotations

from typing import Callable, ClassVar

import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np

from difflax.parameterization import convert
from difflax.schedules import AbstractSchedule


class DiffusionTerm(diffrax.AbstractTerm):
    """dx/dt = d_alpha x0 + d_sigma eps for a model `model_fn(x, t)` of kind `prediction`.

    `vf` is the probability-flow ODE's velocity in the schedule's own time (what Tsit5 /
    Dopri5 integrate); `predict(t, x, kind)` gives the model output in any parameterisation
    (what the exponential-integrator samplers use). One call of either is one NFE.
    """

    model_fn: Callable
    schedule: AbstractSchedule = eqx.field(static=True)
    prediction: str = eqx.field(static=True)

    def evaluate(self, x, t, call):
        """The model at (x, t (B,)); `call` numbers the solver's model calls within a step."""
        return self.model_fn(x, t)

    def predict(self, t, x, kind, call=0):
        t = jnp.asarray(t, x.dtype)
        out = self.evaluate(x, jnp.broadcast_to(t, x.shape[:1]), call)
        if kind == self.prediction:
            return out
        s = self.schedule
        return convert(out, self.prediction, kind, x, s.alpha(t), s.sigma(t), s.d_alpha(t),
                       s.d_sigma(t))

    def vf(self, t, y, args):
        return self.predict(t, y, "velocity")

    def contr(self, t0, t1, **kwargs):
        return t1 - t0

    def prod(self, vf, control):
        return vf * control


def unwrap(terms) -> DiffusionTerm:
    """diffeqsolve wraps terms (time direction); grid solvers want the DiffusionTerm itself."""
    while not isinstance(terms, DiffusionTerm):
        terms = terms.term
    return terms


class AbstractGridSolver(diffrax.AbstractSolver):
    """A solver whose i-th step reads row i of host-computed tables; state starts with i.

    Run with diffrax.StepTo on the same grid. Subclasses implement `_step(term, i, x, state)`
    returning (x_next, state) and `_init_state(x)`. Solvers that can run with a feature cache
    (`difflax.samplers.cached`) also give `first_point(i, x) -> (t, x)`, where step i
    first calls the model, and `calls_per_step`.
    """

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    def order(self, terms):
        return None

    def _init_state(self, y0):
        return None

    def init(self, terms, t0, t1, y0, args):
        return jnp.zeros((), jnp.int32), self._init_state(y0)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        i, state = solver_state
        y1, state = self._step(unwrap(terms), i, y0, state)
        return y1, None, dict(y0=y0, y1=y1), (i + 1, state), diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


def solve(model_fn, noise, *, schedule, solver, grid, prediction="eps", trajectory=False):
    """diffeqsolve of a grid solver with StepTo(ts=grid) from x_T = sigma(grid[0]) noise: the
    final state (B, ...), or with `trajectory` the states at every grid time (N + 1, B, ...).
    Every grid sampler of difflax runs through here."""
    g = np.asarray(grid, np.float64)
    dtype = jnp.asarray(noise).dtype
    x_T = jnp.asarray(float(schedule.sigma(g[0])), dtype) * noise
    term = DiffusionTerm(model_fn, schedule, prediction)
    ts = jnp.asarray(g, dtype)
    saveat = diffrax.SaveAt(ts=ts) if trajectory else diffrax.SaveAt(t1=True)
    sol = diffrax.diffeqsolve(term, solver, ts[0], ts[-1], None, x_T,
                              stepsize_controller=diffrax.StepTo(ts=ts),
                              saveat=saveat, max_steps=len(g) - 1)
    return sol.ys if trajectory else sol.ys[0]
