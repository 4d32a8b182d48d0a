"""Rectified-flow samplers: Euler and Heun on the velocity dx/dt in the schedule's own time
(Liu et al. 2023; Heun as used by Lee et al. 2024, "Improving the Training of Rectified
Flows"). For the rectified-flow schedule Euler coincides with DDIM. Heun skips its correction
on a final step to sigma = 0 (2N - 1 NFE there), as EDM does and rfpp's `generate.py`; with
`final_correction=True` every step is a full Heun step (2N NFE), as torchdiffeq's fixed-grid
Heun that SiT's ODE sampler uses.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from difflax.samplers.term import AbstractGridSolver


class FlowEuler(AbstractGridSolver):
    """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i); times (N+1,)."""

    times: jax.Array

    def _step(self, term, i, x, state):
        h = self.times[i + 1] - self.times[i]
        return (x + h * term.predict(self.times[i], x, "velocity")).astype(x.dtype), state


class FlowHeun(AbstractGridSolver):
    """Heun's method (explicit trapezoidal) on dx/dt = v; to_zero (N,) marks Euler steps."""

    times: jax.Array
    to_zero: jax.Array

    def _step(self, term, i, x, state):
        h = self.times[i + 1] - self.times[i]
        v = term.predict(self.times[i], x, "velocity")
        x1 = x + h * v

        def correct(x1):
            return x + h * (v + term.predict(self.times[i + 1], x1, "velocity")) / 2

        return jax.lax.cond(self.to_zero[i], lambda x1: x1, correct, x1).astype(x.dtype), state


def rf_euler(schedule, grid):
    return FlowEuler(times=jnp.asarray(grid)), len(grid) - 1


def rf_heun(schedule, grid, *, final_correction: bool = False):
    to_zero = np.asarray(schedule.sigma(np.asarray(grid[1:]))) == 0
    to_zero = to_zero & (not final_correction)
    solver = FlowHeun(times=jnp.asarray(grid), to_zero=jnp.asarray(to_zero))
    return solver, 2 * (len(grid) - 1) - int(to_zero.sum())
