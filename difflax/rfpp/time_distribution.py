"""Time distributions p(t) for rectified-flow training (rfpp Sec. 3.1).

All are sampled exactly by inverse CDF of u ~ U(0, 1), then mapped affinely onto
[t_min, t_max] = [1e-5, 1 - 1e-5] as rfpp's `t_dist.sample_t` does:

- "uniform": p(t) = 1.
- "logit_normal": logit(t) ~ N(mean, std^2) (Esser et al. 2024, SD3, Sec. 3.1).
- "u_shaped" (rfpp Sec. 3.1): p(t) = a cosh(a (t - 1/2)) / (2 sinh(a / 2)), a = 4.
  rfpp's code (`t_dist.py`) draws from the truncated exponential a e^(a t) / (e^a - 1) on
  [0, 1] and mirrors half of the draws to 1 - t; that 50/50 mixture has exactly the density
  above, since a (e^(a t) + e^(a (1 - t))) / (2 (e^a - 1)) = a cosh(a (t - 1/2)) / (2 sinh(a/2)).
  Here it is sampled by its own inverse CDF, t = 1/2 + asinh((2u - 1) sinh(a/2)) / a.
  a = 4 is what rfpp's README trains with (`--a 4`; the argparse default is 2).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri

TIME_DISTRIBUTIONS = ("uniform", "logit_normal", "u_shaped")


@dataclasses.dataclass(frozen=True)
class TimeDistribution:
    """p(t) on [t_min, t_max]: a base density on (0, 1) mapped affinely onto the interval.

    kind: one of TIME_DISTRIBUTIONS; `a` is the U-shape's steepness, (mean, std) the
    logit-normal's. `pdf`, `cdf`, `icdf` are of the mapped variable; `sample(key, shape)`
    is icdf(u), u ~ U(0, 1), so every draw is exact (no rejection, no table).
    """

    kind: str = "u_shaped"
    a: float = 4.0
    mean: float = 0.0
    std: float = 1.0
    t_min: float = 1e-5
    t_max: float = 1.0 - 1e-5

    def __post_init__(self):
        if self.kind not in TIME_DISTRIBUTIONS:
            raise ValueError(f"unknown time distribution {self.kind!r}; valid choices: "
                             f"{', '.join(TIME_DISTRIBUTIONS)}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got [{self.t_min}, {self.t_max}]")

    @property
    def _width(self) -> float:
        return self.t_max - self.t_min

    def _base_pdf(self, s):
        if self.kind == "uniform":
            return jnp.ones_like(s)
        if self.kind == "u_shaped":
            return self.a * jnp.cosh(self.a * (s - 0.5)) / (2 * math.sinh(self.a / 2))
        logit = jnp.log(s) - jnp.log1p(-s)
        return (jnp.exp(-0.5 * ((logit - self.mean) / self.std) ** 2)
                / (self.std * math.sqrt(2 * math.pi) * s * (1 - s)))

    def _base_cdf(self, s):
        if self.kind == "uniform":
            return s
        if self.kind == "u_shaped":
            sh = math.sinh(self.a / 2)
            return (jnp.sinh(self.a * (s - 0.5)) + sh) / (2 * sh)
        return ndtr((jnp.log(s) - jnp.log1p(-s) - self.mean) / self.std)

    def _base_icdf(self, u):
        if self.kind == "uniform":
            return u
        if self.kind == "u_shaped":
            return 0.5 + jnp.arcsinh((2 * u - 1) * math.sinh(self.a / 2)) / self.a
        return jax.nn.sigmoid(self.mean + self.std * ndtri(u))

    def pdf(self, t):
        """Density at t (any shape), 0 outside [t_min, t_max]."""
        t = jnp.asarray(t)
        s = (t - self.t_min) / self._width
        inside = (s > 0) & (s < 1)
        return jnp.where(inside, self._base_pdf(jnp.clip(s, 1e-12, 1 - 1e-7)), 0.0) / self._width

    def cdf(self, t):
        s = jnp.clip((jnp.asarray(t) - self.t_min) / self._width, 0.0, 1.0)
        return self._base_cdf(s)

    def icdf(self, u):
        return self.t_min + self._width * self._base_icdf(jnp.asarray(u))

    def sample(self, key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        """Exact draws of shape `shape` by inverse CDF."""
        u = jax.random.uniform(key, shape, dtype, minval=1e-7, maxval=1 - 1e-7)
        return self.icdf(u).astype(dtype)
