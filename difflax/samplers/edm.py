"""EDM's Heun sampler (Karras et al. 2022, Alg. 1 deterministic, Alg. 2 with churn).

Run in EDM's preferred coordinates sigma(t) = t, s(t) = 1 (their sec. 3): on y = x / alpha with
time rho = sigma / alpha, so for the EDM schedule it is exactly Alg. 2, and for other
schedules it is Alg. 2 applied to the rescaled ODE dy/drho = eps. The second-order correction
is skipped on a final step to sigma = 0, so N steps cost 2N - 1 NFE there.
"""
from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from difflax.samplers.deis import check_alpha_positive
from difflax.samplers.term import AbstractGridSolver


class EDMHeun(AbstractGridSolver):
    """Tables (N = steps): times, alpha, rho (N+1,); t_hat, alpha_hat, rho_hat (N,) after churn
    (Alg. 2 lines 4-6); to_zero (N,) bool, the steps ending at sigma = 0."""

    times: jax.Array
    alpha: jax.Array
    rho: jax.Array
    t_hat: jax.Array
    alpha_hat: jax.Array
    rho_hat: jax.Array
    to_zero: jax.Array
    key: jax.Array | None
    s_noise: float = eqx.field(static=True)

    calls_per_step = 2

    def _churn(self, i, x):
        y = x / self.alpha[i]
        if self.key is not None:  # Alg. 2 line 5: x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps
            z = jax.random.normal(jax.random.fold_in(self.key, i), x.shape, x.dtype)
            y = y + jnp.sqrt(self.rho_hat[i] ** 2 - self.rho[i] ** 2) * self.s_noise * z
        return y

    def first_point(self, i, x):
        return self.t_hat[i], self.alpha_hat[i] * self._churn(i, x)

    def _step(self, term, i, x, state):
        y = self._churn(i, x)
        h = self.rho[i + 1] - self.rho_hat[i]
        d = term.predict(self.t_hat[i], self.alpha_hat[i] * y, "eps")  # line 7
        y1 = y + h * d  # line 8

        def correct(y1):  # lines 9-11
            d2 = term.predict(self.times[i + 1], self.alpha[i + 1] * y1, "eps", call=1)
            return y + h * (d + d2) / 2

        y1 = jax.lax.cond(self.to_zero[i], lambda y1: y1, correct, y1)
        return (self.alpha[i + 1] * y1).astype(x.dtype), state


def edm_heun(schedule, grid, *, key=None, s_churn=0.0, s_min=0.0, s_max=float("inf"),
             s_noise=1.0):
    """EDM Heun; churn gamma_i = min(S_churn / N, sqrt 2 - 1) where S_min <= rho_i <= S_max."""
    check_alpha_positive("edm_heun", schedule, grid)
    g = np.asarray(grid, np.float64)
    n = len(g) - 1
    alpha = np.asarray(schedule.alpha(g), np.float64)
    rho = np.asarray(schedule.sigma(g), np.float64) / alpha
    gamma = np.where((rho[:-1] >= s_min) & (rho[:-1] <= s_max),
                     min(s_churn / n, math.sqrt(2) - 1), 0.0) if s_churn > 0 else np.zeros(n)
    if s_churn > 0 and key is None:
        raise ValueError("edm_heun with s_churn > 0 is stochastic: pass key=")
    rho_hat = rho[:-1] * (1 + gamma)
    t_hat = np.where(gamma > 0, np.asarray(schedule.t_from_rho(rho_hat), np.float64), g[:-1])
    alpha_hat = np.asarray(schedule.alpha(t_hat), np.float64)
    to_zero = rho[1:] == 0
    solver = EDMHeun(times=jnp.asarray(g), alpha=jnp.asarray(alpha), rho=jnp.asarray(rho),
                     t_hat=jnp.asarray(t_hat), alpha_hat=jnp.asarray(alpha_hat),
                     rho_hat=jnp.asarray(rho_hat), to_zero=jnp.asarray(to_zero),
                     key=key if s_churn > 0 else None, s_noise=float(s_noise))
    return solver, 2 * n - int(to_zero.sum())
