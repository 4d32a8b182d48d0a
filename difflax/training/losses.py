"""Training losses.

References:
    Karras, Aittala, Aila, Laine. "Elucidating the Design Space of Diffusion-Based
    Generative Models" (EDM), NeurIPS 2022, Sec. 5 and Table 1.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from difflax.models.precond import checked_labels

# D(x_noisy (B, ...), sigma (B,), class_labels (B, L) or None) -> (B, ...)
DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


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
