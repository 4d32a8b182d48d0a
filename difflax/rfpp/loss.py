"""Rectified-flow training (rfpp Sec. 2-3): the path, premetrics and the loss.

On the path x_t = (1 - t) x + t z (t = 1 noise, t = 0 data; Liu et al. 2023, eq. 1) a
velocity model v(x_t, t) is fitted to the target dx_t/dt = z - x (Lee, Lin & Fanti 2024,
"Improving the Training of Rectified Flows" (rfpp), eq. 2-3):

    L = E_t E_(x, z) [ m(v(x_t, t), z - x) ],  t ~ p(t),  m a premetric.

The path is the rectified-flow schedule (`rf_schedule`), read through
`difflax.parameterization.path_coefficients` as SiT's interpolant loss reads its
interpolants (`difflax.training.interpolant_loss`): the linear path is written once. p(t) is a
`TimeDistribution` (difflax.rfpp.time_distribution).

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

import math
from typing import Callable

import jax
import jax.numpy as jnp

from difflax.models.precond import checked_labels
from difflax.parameterization import path_coefficients
from difflax.rfpp.few_step import rf_schedule
from difflax.rfpp.time_distribution import TimeDistribution

PREMETRICS = ("l2", "l2_squared", "pseudo_huber", "lpips", "lpips_huber")
HUBER_C = 0.00054

# v(x_t (B, ...), t (B,), class_labels (B, L) or None) -> velocity (B, ...)
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
# lpips(images_a (B, H, W, C), images_b (B, H, W, C)) in [-1, 1] -> distance (B,)
LpipsFn = Callable[[jax.Array, jax.Array], jax.Array]


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


def linear_path(x: jax.Array, z: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_t, dx_t/dt) = ((1 - t) x + t z, z - x) on the rectified-flow schedule (rfpp eq. 1-2).

    x: data (B, ...), z: noise (B, ...), t: times (B,) (noise at t = 1).
    """
    alpha, sigma, d_alpha, d_sigma = path_coefficients(rf_schedule(), jnp.asarray(t), x)
    return alpha * x + sigma * z, d_alpha * x + d_sigma * z


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
    x_t, target = linear_path(x, z, t)
    v = velocity_fn(x_t, t, class_labels)
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
    (difflax.rfpp.reflow), or (x, labels) to draw z ~ N(0, I) from the key (one round
    of rectified flow from data). labels (B,) int for a conditional model (one-hot over
    model.label_dim), None for an unconditional one; a batch that does not fit the model is an
    error (`difflax.models.precond.checked_labels`).
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
