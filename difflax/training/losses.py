"""Training losses.

References:
    Karras, Aittala, Aila, Laine. "Elucidating the Design Space of Diffusion-Based
    Generative Models" (EDM), NeurIPS 2022, Sec. 5 and Table 1.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# D(x_noisy (B, ...), sigma (B,), class_labels (B, L) or None) -> (B, ...)
DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


def model_signature(model) -> tuple[tuple[int, ...], int]:
    """(input_shape, label_dim) that `model` declares: one example's shape and its number of
    classes (0: unconditional). `difflax.models.Denoiser` reads them from its UNet config; any
    other Flax denoiser used for training declares both as attributes."""
    if not (hasattr(model, "input_shape") and hasattr(model, "label_dim")):
        raise ValueError(f"{type(model).__name__} declares no input_shape and label_dim; "
                         "training reads both from the model (difflax.models.Denoiser has them)")
    return tuple(model.input_shape), int(model.label_dim)


def checked_labels(model, x: jax.Array, labels: jax.Array | None) -> jax.Array | None:
    """One-hot class labels (B, label_dim) for a conditional model, None for an unconditional
    one, after checking the batch against the model: images x (B, *input_shape) and integer
    labels (B,) exactly when the model is conditional. Raises ValueError on a mismatch."""
    shape, label_dim = model_signature(model)
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"the data's examples have shape {tuple(x.shape[1:])} but the model "
                         f"takes {shape}")
    if label_dim and labels is None:
        raise ValueError(f"the model is conditional on {label_dim} classes but the batch has "
                         "no labels; pass (images, labels)")
    if not label_dim and labels is not None:
        raise ValueError("the model is unconditional (label_dim 0) but the batch has labels; "
                         "pass (images, None), or build a conditional model")
    return jax.nn.one_hot(labels, label_dim, dtype=x.dtype) if label_dim else None


def edm_loss(denoise_fn: DenoiseFn, x: jax.Array, *, key: jax.Array,
             class_labels: jax.Array | None = None, p_mean: float = -1.2,
             p_std: float = 1.2, sigma_data: float = 0.5) -> jax.Array:
    """EDM denoising loss (Karras et al. 2022, Sec. 5, Table 1), a scalar.

        ln sigma ~ N(p_mean, p_std^2),  n ~ N(0, sigma^2 I),
        loss = E[ lambda(sigma) ||D(x + n; sigma) - x||^2 ],
        lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

    x: clean data (B, ...), e.g. images (B, H, W, C) in [-1, 1]. The squared error is
    averaged over all elements (the paper sums over pixels; this only rescales the loss).
    """
    k_sigma, k_noise = jax.random.split(key)
    batch = x.shape[0]
    sigma = jnp.exp(p_mean + p_std * jax.random.normal(k_sigma, (batch,), x.dtype))
    expand = (batch,) + (1,) * (x.ndim - 1)
    noise = jax.random.normal(k_noise, x.shape, x.dtype) * sigma.reshape(expand)
    denoised = denoise_fn(x + noise, sigma, class_labels)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return jnp.mean(weight.reshape(expand) * (denoised - x) ** 2)


def get_edm_loss_fn(model, *, p_mean: float = -1.2, p_std: float = 1.2,
                    sigma_data: float = 0.5):
    """Returns loss_fn(params, batch, key) -> scalar for a Flax denoiser module.

    batch = (images (B, *model.input_shape), labels (B,) int, or None for an unconditional
    model); labels become one-hot (B, model.label_dim). A batch that does not fit the model
    is an error (`checked_labels`). Dropout draws from `key`.
    """

    def loss_fn(params, batch, key):
        x, labels = batch
        k_loss, k_dropout = jax.random.split(key)
        onehot = checked_labels(model, x, labels)

        def denoise(x_noisy, sigma, class_labels):
            return model.apply({"params": params}, x_noisy, sigma, class_labels,
                               train=True, rngs={"dropout": k_dropout})

        return edm_loss(denoise, x, key=k_loss, class_labels=onehot, p_mean=p_mean,
                        p_std=p_std, sigma_data=sigma_data)

    return loss_fn
