"""Preconditioning: a raw UNet F becomes a denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

Karras et al. 2022 (EDM), Table 1 and eq. (7); NVlabs/edm `EDMPrecond`, `VPPrecond`,
`VEPrecond`. Everything is NHWC; sigma is a scalar or one noise level per sample.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax.models.dhariwal_unet import DhariwalUNet
from difflax.models.song_unet import SongUNet
from difflax.models.unet import UNetConfig

PRECONDS = ("edm", "vp", "ve")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def check_compute_dtype(dtype: str) -> None:
    """Raises ValueError unless `dtype` is one of COMPUTE_DTYPES (a model's `dtype` field)."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid choices: {', '.join(COMPUTE_DTYPES)}")


def make_unet(config: UNetConfig) -> nn.Module:
    """The UNet module for `config.model_type`."""
    return {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}[config.model_type](config)


class Denoiser(nn.Module):
    """D(x; sigma) for one UNet and one preconditioning of EDM's Table 1.

    - "edm": c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
      c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4, sd = `sigma_data`.
    - "vp": c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1),
      c_noise = (M - 1) sigma^-1(sigma) with sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1).
    - "ve": c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2).

    `apply(variables, x, sigma, class_labels=None, skip_scales=None, train=False)` with
    x: (B, H, W, C), sigma: () or (B,), class_labels: (B, label_dim) one-hot (or integer
    labels (B,), converted), returns D(x; sigma) of x's shape. The UNet's parameters sit
    under `model`, as EDM's sit under `model.`. `input_shape` and `label_dim` (from `net`)
    are what training reads to initialise the model and check its data.

    `dtype` ("float32", "bfloat16" or "float16"): the UNet computes in it, as EDMPrecond's
    `use_fp16` does: (c_in x) is cast to it, every layer casts its float32 parameters to its
    input's dtype, GroupNorm statistics and attention logits stay float32, and the output F
    returns to float32 before c_skip x + c_out F. Parameters and their gradients stay
    float32 (mixed precision); the value does not change the parameters, only the compute.
    """

    net: UNetConfig
    precond: str = "edm"
    sigma_data: float = 0.5
    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000
    dtype: str = "float32"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One example's shape (R, R, C), from the UNet's config."""
        return (self.net.img_resolution, self.net.img_resolution, self.net.in_channels)

    @property
    def label_dim(self) -> int:
        """Number of classes (0: unconditional), from the UNet's config."""
        return self.net.label_dim

    def setup(self):
        if self.precond not in PRECONDS:
            raise ValueError(f"unknown precond {self.precond!r}; valid choices: {', '.join(PRECONDS)}")
        check_compute_dtype(self.dtype)
        self.model = make_unet(self.net)

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) for sigma of shape (B,)."""
        if self.precond == "edm":
            sd2 = self.sigma_data**2
            return (sd2 / (sigma**2 + sd2), sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2),
                    1 / jnp.sqrt(sigma**2 + sd2), jnp.log(sigma) / 4)
        if self.precond == "vp":
            t = (jnp.sqrt(self.beta_min**2 + 2 * self.beta_d * jnp.log1p(sigma**2)) - self.beta_min) / self.beta_d
            return jnp.ones_like(sigma), -sigma, 1 / jnp.sqrt(sigma**2 + 1), (self.M - 1) * t
        return jnp.ones_like(sigma), sigma, jnp.ones_like(sigma), jnp.log(0.5 * sigma)

    def _inputs(self, batch, sigma, class_labels):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (batch,))
        if self.net.label_dim:
            if class_labels is None:
                class_labels = jnp.zeros((batch, self.net.label_dim), jnp.float32)
            elif jnp.ndim(class_labels) == 1:
                class_labels = jax.nn.one_hot(class_labels, self.net.label_dim)
            class_labels = jnp.asarray(class_labels, jnp.float32).reshape(-1, self.net.label_dim)
        else:
            class_labels = None
        return sigma, class_labels

    def run(self, x, sigma, class_labels=None, *, cache=None, reuse=(), store=(), output=True,
            skip_scales=None, augment_labels=None, train=False):
        """D(x; sigma) with the UNet's feature cache (`EDMUNet.run`): nodes in `reuse` come
        from `cache`, nodes in `store` are returned. x may be None when nothing computed reads
        it and `output` is False; sigma then gives the batch size.

        Returns (D (B, H, W, C) or None, {name: value}). The cached "out" node is the raw
        network output F, so a reused F still gets c_skip x + c_out F with the current x.
        """
        batch = jnp.size(sigma) if x is None else x.shape[0]
        sigma, class_labels = self._inputs(batch, sigma, class_labels)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        emb = self.model.embed(c_noise, class_labels, augment_labels, train)
        x_in = None if x is None else (c_in[:, None, None, None] * x).astype(self.dtype)
        f, stored = self.model.run(x_in, emb,
                                   cache=cache, reuse=reuse, store=store, output=output,
                                   skip_scales=skip_scales, train=train)
        if not output:
            return None, stored
        return c_skip[:, None, None, None] * x + c_out[:, None, None, None] * f.astype(jnp.float32), stored

    def __call__(self, x, sigma, class_labels=None, *, skip_scales=None, augment_labels=None,
                 train=False):
        return self.run(x, sigma, class_labels, skip_scales=skip_scales,
                        augment_labels=augment_labels, train=train)[0]


# ----------------------------------------------------------------------------
# What a denoiser takes, checked against a training batch.


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
