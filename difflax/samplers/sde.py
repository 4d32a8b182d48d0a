"""Euler-Maruyama for the reverse-time SDE (Song et al. 2021, score_sde eq. 6).

Forward SDE of x_t = alpha x0 + sigma eps: dx = f x dt + g dW with f = alpha'/alpha and
g^2 = 2 sigma^2 (sigma'/sigma - alpha'/alpha). Reverse: dx = (f x - g^2 score) dt + g dW_bar,
score = -eps / sigma, stepped backwards with h = t_{i+1} - t_i < 0:

    x_{i+1} = x_i + (f_i x_i + g_i^2 eps_i / sigma_i) h + g_i sqrt(-h) z_i,

z_i = normal(fold_in(key, i)). Strong order 1/2, weak order 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from difflax.samplers.deis import check_alpha_positive
from difflax.samplers.term import AbstractGridSolver


class EulerMaruyama(AbstractGridSolver):
    """Tables (N,): times t_i, drift f_i, diffusion g_i, sigma_i, step h_i."""

    times: jax.Array
    f: jax.Array
    g: jax.Array
    sigma: jax.Array
    h: jax.Array
    key: jax.Array

    def _step(self, term, i, x, state):
        eps = term.predict(self.times[i], x, "eps")
        z = jax.random.normal(jax.random.fold_in(self.key, i), x.shape, x.dtype)
        drift = self.f[i] * x + self.g[i] ** 2 * eps / self.sigma[i]
        x1 = x + drift * self.h[i] + self.g[i] * jnp.sqrt(-self.h[i]) * z
        return x1.astype(x.dtype), state


def euler_maruyama(schedule, grid, *, key=None):
    if key is None:
        raise ValueError("euler_maruyama is stochastic: pass key=")
    check_alpha_positive("euler_maruyama", schedule, grid)
    t = np.asarray(grid[:-1], np.float64)
    alpha, sigma = np.asarray(schedule.alpha(t)), np.asarray(schedule.sigma(t))
    f = np.asarray(schedule.d_alpha(t)) / alpha
    g2 = 2 * sigma**2 * (np.asarray(schedule.d_sigma(t)) / sigma - f)
    solver = EulerMaruyama(times=jnp.asarray(t), f=jnp.asarray(f),
                           g=jnp.asarray(np.sqrt(np.maximum(g2, 0))),
                           sigma=jnp.asarray(sigma), h=jnp.asarray(np.diff(grid)), key=key)
    return solver, len(grid) - 1
