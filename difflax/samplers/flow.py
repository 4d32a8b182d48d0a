"""Rectified-flow samplers: Euler and Heun on the velocity dx/dt in the schedule's own time
(Liu et al. 2023; Heun as used by Lee et al. 2024, "Improving the Training of Rectified
Flows" (rfpp)), and rfpp's re-noising sampler. For the rectified-flow schedule Euler coincides
with DDIM. Heun skips its correction on a final step to sigma = 0 (2N - 1 NFE there), as EDM
does and rfpp's `generate.py`; with `final_correction=True` every step is a full Heun step
(2N NFE), as torchdiffeq's fixed-grid Heun that SiT's ODE sampler uses.

`rf_renoise` is rfpp's "new" sampler (`generate.py --sampler new`): from the data prediction
x_hat = x_t - t v at t_i, the next state re-noises x_hat with the *initial* noise z1,

    x_{i+1} = (1 - t_{i+1}) x_hat + t_{i+1} z1,

instead of Euler's x_{i+1} = (1 - t_{i+1}) x_hat + t_{i+1} z_hat (z_hat = x_hat + v, the
model's own noise estimate). One step of either is the same; from two steps on they differ.
rfpp's grids and its straightness measure are in `difflax.rfpp`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from difflax import schedules
from difflax.samplers.term import AbstractGridSolver, solve


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


class FlowRenoise(AbstractGridSolver):
    """x_{i+1} = (1 - t_{i+1}) x_hat(x_i, t_i) + t_{i+1} z1, z1 = x at the first time; (N+1,)."""

    times: jax.Array

    def _init_state(self, y0):
        return y0

    def _step(self, term, i, x, z1):
        x_hat = term.predict(self.times[i], x, "x0")
        t_next = self.times[i + 1]
        return ((1 - t_next) * x_hat + t_next * z1).astype(x.dtype), z1


def rf_renoise(schedule, grid):
    """(solver, nfe) of the re-noising sampler; the schedule must be a rectified flow."""
    if not isinstance(schedule, schedules.RectifiedFlow):
        raise ValueError("rf_renoise runs on the rectified-flow schedule (x_t = (1 - t) x + t z)")
    return FlowRenoise(times=jnp.asarray(grid)), len(grid) - 1


def euler_trajectory(model_fn, noise, *, schedule, grid, prediction="velocity") -> jax.Array:
    """States of the Euler (rf_euler) solution at every grid time: (N + 1, B, ...)."""
    ts = jnp.asarray(np.asarray(grid, np.float64), jnp.asarray(noise).dtype)
    return solve(model_fn, noise, schedule=schedule, solver=FlowEuler(times=ts), grid=grid,
                 prediction=prediction, trajectory=True)
