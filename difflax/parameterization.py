"""Conversions between model parameterisations, so that any model feeds any sampler.

For x_t = alpha x_0 + sigma eps (alpha, sigma, and their time derivatives d_alpha, d_sigma):

  "eps"       the noise eps                                   (DDPM, DEIS)
  "x0"        the denoiser E[x_0 | x_t]                       (EDM's D, DPM-Solver++)
  "v"         v = alpha eps - sigma x_0                       (Salimans & Ho 2022)
  "velocity"  dx_t/dt = d_alpha x_0 + d_sigma eps             (flow matching / rectified flow)
  "score"     grad log p_t(x_t) = -eps / sigma                (score_sde)

Scalars alpha, sigma (or per-sample arrays of shape (B,)) broadcast against x of shape (B, ...).
"""
from __future__ import annotations

import jax.numpy as jnp

PREDICTIONS = ("eps", "x0", "v", "velocity", "score")


def _check(kind):
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction {kind!r}; choose one of {PREDICTIONS}")


def _bcast(a, x):
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


def to_x0_eps(out, kind, x, alpha, sigma, d_alpha=None, d_sigma=None):
    """(x_0, eps) from a model output `out` of parameterisation `kind` at state x."""
    _check(kind)
    a, s = _bcast(alpha, x), _bcast(sigma, x)
    if kind == "eps":
        return (x - s * out) / a, out
    if kind == "x0":
        return out, (x - a * out) / s
    if kind == "score":
        eps = -s * out
        return (x - s * eps) / a, eps
    if kind == "v":
        n = a**2 + s**2
        return (a * x - s * out) / n, (s * x + a * out) / n
    da, ds = _bcast(d_alpha, x), _bcast(d_sigma, x)
    det = a * ds - s * da
    return (ds * x - s * out) / det, (a * out - da * x) / det


def from_x0_eps(x0, eps, kind, alpha, sigma, d_alpha=None, d_sigma=None):
    """The parameterisation `kind` of the pair (x_0, eps)."""
    _check(kind)
    a, s = _bcast(alpha, x0), _bcast(sigma, x0)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "score":
        return -eps / s
    if kind == "v":
        return a * eps - s * x0
    return _bcast(d_alpha, x0) * x0 + _bcast(d_sigma, x0) * eps


def convert(out, from_kind, to_kind, x, alpha, sigma, d_alpha=None, d_sigma=None):
    """Converts a model output between parameterisations; the identity if they agree.

    eps and x0 are converted directly (one division) rather than through the pair, so that
    e.g. an x0 model asked for eps costs (x - alpha x0) / sigma and nothing more.
    """
    _check(from_kind)
    _check(to_kind)
    if from_kind == to_kind:
        return out
    a, s = _bcast(alpha, x), _bcast(sigma, x)
    if from_kind == "x0" and to_kind == "eps":
        return (x - a * out) / s
    if from_kind == "eps" and to_kind == "x0":
        return (x - s * out) / a
    x0, eps = to_x0_eps(out, from_kind, x, alpha, sigma, d_alpha, d_sigma)
    return from_x0_eps(x0, eps, to_kind, alpha, sigma, d_alpha, d_sigma)


def path_coefficients(schedule, t, x):
    """(alpha, sigma, d_alpha, d_sigma) of `schedule` at times t (B,), each reshaped to
    (B, 1, ..., 1) against x (B, ...): the forward process x_t = alpha x_0 + sigma eps and its
    velocity dx_t/dt = d_alpha x_0 + d_sigma eps, what a flow-matching loss regresses on."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    return tuple(jnp.reshape(f(t), shape)
                 for f in (schedule.alpha, schedule.sigma, schedule.d_alpha, schedule.d_sigma))
