"""SiT's training loss for an interpolant and a prediction target (SiT Sec. 2-3;
willisma/SiT `Transport.training_losses`), on difflax's schedules in time s = 1 - t.

    t ~ U[t0, t1],  eps ~ N(0, I),  x_t = alpha_t x + sigma_t eps,
    velocity: || v(x_t, t) - (alpha_t' x + sigma_t' eps) ||^2          (t-derivatives)
    noise:    w_t || eps_hat(x_t, t) - eps ||^2
    score:    w_t || sigma_t s(x_t, t) + eps ||^2

with w_t = 1, or for `loss_weight` "velocity" (drift_var / sigma_t)^2 and "likelihood"
drift_var / sigma_t^2, drift_var = sigma^2 (dlog sigma - dlog alpha) (SiT `path.compute_drift`).
Squared errors are averaged over all elements (SiT's mean_flat, then the batch mean).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from difflax.interpolants import (SIT_PREDICTIONS, check_choice, default_eps, interpolant_schedule,
                                  time_interval)
from difflax.parameterization import path_coefficients

LOSS_WEIGHTS = (None, "velocity", "likelihood")


def repa_loss(projected, target):
    """REPA's alignment loss (Yu et al., "Representation Alignment for Generation", ICLR
    2025, Sec. 3; GMem trains with it): minus the mean cosine similarity of
    projected tokens (B, T, D) and encoder features, per token (B, T, D) or one per image
    (B, D) (e.g. the snippet itself, broadcast over tokens). A scalar in [-1, 1]."""
    target = jnp.broadcast_to(target[:, None] if target.ndim == 2 else target, projected.shape)
    unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
    return -jnp.mean(jnp.sum(unit(projected) * unit(target), axis=-1))


def interpolant_loss(sit_fn, x: jax.Array, *, key: jax.Array, interpolant: str = "linear",
                     prediction: str = "velocity", loss_weight: str | None = None,
                     eps: float | None = None, has_aux: bool = False):
    """The interpolant loss (a scalar) of sit_fn(x_t (B, ...), t (B,)) on data x (B, ...).

    t is SiT's time (t = 1 data); eps defaults to SiT's train_eps for the interpolant and
    prediction (`difflax.interpolants.default_eps`). With `has_aux`, sit_fn returns
    (output, aux) and the result is (loss, aux).
    """
    check_choice("loss_weight", loss_weight, LOSS_WEIGHTS)
    eps = default_eps(interpolant, prediction, train=True) if eps is None else eps
    t0, t1 = time_interval(interpolant, prediction, eps=eps)
    schedule = interpolant_schedule(interpolant)
    k_t, k_noise = jax.random.split(key)
    b = x.shape[0]
    t = jax.random.uniform(k_t, (b,), x.dtype, t0, t1)
    noise = jax.random.normal(k_noise, x.shape, x.dtype)
    s = 1.0 - t
    alpha, sigma, d_alpha, d_sigma = path_coefficients(schedule, s, x)
    out = sit_fn(alpha * x + sigma * noise, t)
    out, aux = out if has_aux else (out, None)
    check_choice("prediction", prediction, tuple(SIT_PREDICTIONS))
    if prediction == "velocity":  # d/dt = -d/ds
        loss = jnp.mean((out + d_alpha * x + d_sigma * noise) ** 2)
    else:
        drift_var = sigma * d_sigma - sigma**2 * d_alpha / alpha
        weight = {None: 1.0, "velocity": (drift_var / sigma) ** 2,
                  "likelihood": drift_var / sigma**2}[loss_weight]
        loss = jnp.mean(weight * ((out - noise) if prediction == "noise"
                                  else (out * sigma + noise)) ** 2)
    return (loss, aux) if has_aux else loss


def get_interpolant_loss_fn(model, *, interpolant: str = "linear", prediction: str = "velocity",
                            loss_weight: str | None = None, eps: float | None = None,
                            repa_weight: float = 0.0):
    """loss_fn(params, batch, key) -> scalar for a `difflax.models.SiT`, for the train step.

    batch = (images (B, H, W, C), labels (B,) int) or (images, labels, snippets (B, D)):
    labels are used if the SiT has num_classes > 0, snippets if it has snippet_dim > 0
    (GMem: the memory snippet of each training image). With `repa_weight` > 0 (a SiT with
    repa_dim > 0) the batch ends with REPA targets (B, T, repa_dim) or (B, repa_dim), and
    repa_weight * `repa_loss` is added (REPA, Yu et al. ICLR 2025, Sec. 3). Label and
    snippet dropout draw from `key` (rng stream "dropout").
    """
    check_choice("interpolant", interpolant, ("linear", "gvp", "vp"))
    cfg = model.config

    if repa_weight and not cfg.repa_dim:
        raise ValueError("repa_weight > 0 needs a SiT with repa_dim > 0 (and repa_depth)")

    def loss_fn(params, batch, key):
        x, labels, *rest = batch
        targets = rest.pop() if repa_weight else None
        snippets = rest[0] if rest else None
        if cfg.snippet_dim and snippets is None:
            raise ValueError("this SiT is conditioned on memory snippets: pass batches "
                             "(images, labels, snippets)")
        k_loss, k_drop = jax.random.split(key)
        y = labels if cfg.num_classes else None
        snippet = snippets if cfg.snippet_dim else None

        def sit_fn(xt, t):
            return model.apply({"params": params}, xt, t, y, snippet, train=True,
                               return_repa=bool(repa_weight), rngs={"dropout": k_drop})

        loss = interpolant_loss(sit_fn, x, key=k_loss, interpolant=interpolant,
                                prediction=prediction, loss_weight=loss_weight, eps=eps,
                                has_aux=bool(repa_weight))
        if not repa_weight:
            return loss
        return loss[0] + repa_weight * repa_loss(loss[1], targets)

    return loss_fn
