"""Rectified-flow training: the linear path, time distributions, premetrics and the loss.

On the path x_t = (1 - t) x + t z (t = 1 noise, t = 0 data; Liu et al. 2023, eq. 1) a
velocity model v(x_t, t) is fitted to the target z - x (Lee, Lin & Fanti 2024, "Improving
the Training of Rectified Flows" (rfpp), eq. 2-3):

    L = E_t E_(x, z) [ m(v(x_t, t), z - x) ],  t ~ p(t),  m a premetric.

Time distributions (all sampled exactly by inverse CDF of u ~ U(0, 1), then mapped affinely
onto [t_min, t_max] = [1e-5, 1 - 1e-5] as rfpp's `t_dist.sample_t` does):

- "uniform": p(t) = 1.
- "logit_normal": logit(t) ~ N(mean, std^2) (Esser et al. 2024, SD3, Sec. 3.1).
- "u_shaped" (rfpp Sec. 3.1): p(t) = a cosh(a (t - 1/2)) / (2 sinh(a / 2)), a = 4.
  rfpp's code (`t_dist.py`) draws from the truncated exponential a e^(a t) / (e^a - 1) on
  [0, 1] and mirrors half of the draws to 1 - t; that 50/50 mixture has exactly the density
  above, since a (e^(a t) + e^(a (1 - t))) / (2 (e^a - 1)) = a cosh(a (t - 1/2)) / (2 sinh(a/2)).
  Here it is sampled by its own inverse CDF, t = 1/2 + asinh((2u - 1) sinh(a/2)) / a.
  a = 4 is what rfpp's README trains with (`--a 4`; the argparse default is 2).

Premetrics m(pred, target), one value per example, shape (B,):

- "l2": the root mean square of the example's d errors, sqrt(||pred - target||^2 / d)
  (rfpp's `loss_type='l2'`, its default).
- "l2_squared": the mean square, ||pred - target||^2 / d (rfpp's `l2-squared`; Liu et al.'s
  rectified-flow loss).
- "pseudo_huber": (sqrt(||pred - target||^2 + c^2) - c) / d. rfpp's code (`train.py`,
  `loss_type='huber'`) uses c = 0.00054 d on the *summed* squares and divides by d; the
  improved-consistency-training constant (Song & Dhariwal 2023, Sec. 3.3) is
  c = 0.00054 sqrt(d). Both are offered (`huber_c_scaling` "d" = rfpp's code, the
  default, or "sqrt_d"); the division by d only rescales the loss.
- "lpips": LPIPS(x_hat, x) between the model's data prediction x_hat = x_t - t v and x,
  images resized to `lpips_resolution` first (rfpp: bilinear to 224).
- "lpips_huber" (rfpp eq. 8): (1 - t) pseudo_huber(v, z - x) + LPIPS(x_hat, x), with
  LPIPS divided by t if `lpips_div_t` (rfpp's `--lpips_divt`, its CIFAR-10 config F).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri

from difflax.training.losses import checked_labels

TIME_DISTRIBUTIONS = ("uniform", "logit_normal", "u_shaped")
PREMETRICS = ("l2", "l2_squared", "pseudo_huber", "lpips", "lpips_huber")
HUBER_C = 0.00054

# v(x_t (B, ...), t (B,), class_labels (B, L) or None) -> velocity (B, ...)
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
# lpips(images_a (B, H, W, C), images_b (B, H, W, C)) in [-1, 1] -> distance (B,)
LpipsFn = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------
# Time distributions.


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


# ----------------------------------------------------------------------------
# Premetrics: one value per example, shape (B,).


def _per_example_sum(x):
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def squared_l2(pred: jax.Array, target: jax.Array) -> jax.Array:
    """mean over each example's d elements of (pred - target)^2: (B, ...) -> (B,)."""
    d = math.prod(pred.shape[1:])
    return _per_example_sum((pred - target) ** 2) / d


def rms_l2(pred: jax.Array, target: jax.Array) -> jax.Array:
    """sqrt of `squared_l2`, the root mean square error of each example: (B, ...) -> (B,)."""
    return jnp.sqrt(squared_l2(pred, target))


def huber_constant(d: int, scaling: str = "d") -> float:
    """The pseudo-Huber c for data dimension d: 0.00054 d (rfpp's code) or 0.00054 sqrt(d)
    (iCT, Song & Dhariwal 2023)."""
    if scaling == "d":
        return HUBER_C * d
    if scaling == "sqrt_d":
        return HUBER_C * math.sqrt(d)
    raise ValueError(f"unknown huber_c_scaling {scaling!r}; valid choices: d, sqrt_d")


def pseudo_huber(pred: jax.Array, target: jax.Array, c: float | None = None, *,
                 scaling: str = "d") -> jax.Array:
    """(sqrt(||pred - target||^2 + c^2) - c) / d per example: (B, ...) -> (B,).

    c defaults to `huber_constant(d, scaling)`, d the number of elements of one example.
    """
    d = math.prod(pred.shape[1:])
    c = huber_constant(d, scaling) if c is None else c
    return (jnp.sqrt(_per_example_sum((pred - target) ** 2) + c**2) - c) / d


# ----------------------------------------------------------------------------
# The path, the teacher re-expression and the loss.


def _bcast(t, x):
    return jnp.asarray(t).reshape((-1,) + (1,) * (x.ndim - 1))


def interpolate(x: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x + t z; x, z (B, ...), t (B,)."""
    t = _bcast(t, x)
    return (1 - t) * x + t * z


def velocity_from_denoiser(denoise_fn) -> VelocityFn:
    """An EDM denoiser D(x; sigma) as a velocity field on the rectified-flow path.

    x_t = (1 - t) x + t z, so x_t / (1 - t) = x + sigma z with sigma = t / (1 - t): the
    EDM noisy image at noise level sigma. With x_hat = D(x_t / (1 - t); sigma),

        v(x_t, t) = (x_t - x_hat) / t       (= z_hat - x_hat, the velocity of the path),

    which is exactly the teacher's probability-flow ODE written in time t (rfpp's
    `EDMPrecondVel`, Sec. 4 "initialisation with a pre-trained diffusion model"), so a
    2-rectified flow initialised from the teacher's parameters starts at the teacher's ODE.
    denoise_fn(x (B, ...), sigma (B,), class_labels) -> (B, ...); t in (0, 1), shape (B,).
    """

    def velocity(x_t, t, class_labels=None):
        tb = _bcast(t, x_t)
        x_hat = denoise_fn(x_t / (1 - tb), t / (1 - t), class_labels)
        return (x_t - x_hat) / tb

    return velocity


def rectified_flow_loss(velocity_fn: VelocityFn, x: jax.Array, z: jax.Array, t: jax.Array, *,
                        premetric: str = "l2", class_labels: jax.Array | None = None,
                        huber_c_scaling: str = "d", lpips_fn: LpipsFn | None = None,
                        lpips_div_t: bool = False) -> jax.Array:
    """The rectified-flow loss (rfpp eq. 3 with premetric m), a scalar (mean over the batch).

    x: data (B, ...) (for Reflow: the teacher's sample), z: noise (B, ...) paired with it,
    t: times (B,). LPIPS premetrics need `lpips_fn` and image-shaped x (B, H, W, C).
    """
    if premetric not in PREMETRICS:
        raise ValueError(f"unknown premetric {premetric!r}; valid choices: {', '.join(PREMETRICS)}")
    x_t = interpolate(x, z, t)
    v = velocity_fn(x_t, t, class_labels)
    target = z - x
    if premetric == "l2":
        return jnp.mean(rms_l2(v, target))
    if premetric == "l2_squared":
        return jnp.mean(squared_l2(v, target))
    if premetric == "pseudo_huber":
        return jnp.mean(pseudo_huber(v, target, scaling=huber_c_scaling))
    if lpips_fn is None:
        raise ValueError(f"premetric {premetric!r} needs lpips_fn (difflax.metrics.get_lpips_fn)")
    x_hat = x_t - _bcast(t, x) * v
    perceptual = lpips_fn(x_hat, x)
    if lpips_div_t:
        perceptual = perceptual / t
    if premetric == "lpips":
        return jnp.mean(perceptual)
    return jnp.mean((1 - t) * pseudo_huber(v, target, scaling=huber_c_scaling) + perceptual)


def get_rectified_flow_loss_fn(model, *, time_dist: TimeDistribution = TimeDistribution(),
                               premetric: str = "l2", huber_c_scaling: str = "d",
                               lpips_fn: LpipsFn | None = None, lpips_div_t: bool = False):
    """loss_fn(params, batch, key) -> scalar for the training loop (difflax.training.train).

    `model` is an EDM-preconditioned Flax denoiser (difflax.models.Denoiser), used as a
    velocity through `velocity_from_denoiser`. batch = (x, z, labels) of Reflow pairs
    (difflax.training.reflow), or (x, labels) to draw z ~ N(0, I) from the key (one round
    of rectified flow from data). labels (B,) int for a conditional model (one-hot over
    model.label_dim), None for an unconditional one; a batch that does not fit the model is an
    error (`difflax.training.losses.checked_labels`).
    """
    if premetric not in PREMETRICS:
        raise ValueError(f"unknown premetric {premetric!r}; valid choices: {', '.join(PREMETRICS)}")

    def loss_fn(params, batch, key):
        k_t, k_z, k_dropout = jax.random.split(key, 3)
        if len(batch) == 3:
            x, z, labels = batch
        else:
            (x, labels), z = batch, None
        if z is None:
            z = jax.random.normal(k_z, x.shape, x.dtype)
        onehot = checked_labels(model, x, labels)

        def denoise(x_noisy, sigma, class_labels):
            return model.apply({"params": params}, x_noisy, sigma, class_labels, train=True,
                               rngs={"dropout": k_dropout})

        t = time_dist.sample(k_t, (x.shape[0],), x.dtype)
        return rectified_flow_loss(velocity_from_denoiser(denoise), x, z, t,
                                   premetric=premetric, class_labels=onehot,
                                   huber_c_scaling=huber_c_scaling, lpips_fn=lpips_fn,
                                   lpips_div_t=lpips_div_t)

    return loss_fn
