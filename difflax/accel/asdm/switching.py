"""A-SDM multi-UNet switching: the full model for the early, noisy steps, the light one after.

Zhu et al., "A-SDM: Accelerating Stable Diffusion through Model Assembly and Feature
Inheritance Strategies" (2024), Sec. 3.3 (multi-UNet switching). `switch_sigma` places the
switch between two grid points; `MultiUNetDenoiser` is a denoiser that samplers and
`difflax.workdir.get_sample_fn` accept like any other; `get_multi_unet_fn` does the same for
two model functions.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from difflax.models.precond import Denoiser


def switch_sigma(grid, step: int) -> float:
    """The threshold that gives grid points 0 .. step-1 to the full model, the rest to the light.

    grid: the sampler's decreasing time grid (time = sigma on EDM's schedule); the threshold
    is the geometric mean of grid[step - 1] and grid[step]. step = 0: all light; step >=
    len(grid): all full.
    """
    g = np.asarray(grid, np.float64)
    if step <= 0:
        return math.inf
    if step >= len(g):
        return -math.inf
    lo = max(float(g[step]), 1e-12)
    return float(math.sqrt(float(g[step - 1]) * lo))


class MultiUNetDenoiser(nn.Module):
    """D(x; sigma) = full(x; sigma) if sigma > switch else light(x; sigma) (A-SDM multi-UNet).

    Parameters {"full": full's params, "light": light's params}. sigma: () or (B,), the same
    for the whole batch, as samplers call it (the first entry decides). Under `jit` only the
    chosen model runs (`lax.cond`); under `vmap` over sigma both would run. `net` is the light
    model's UNetConfig, so `difflax.workdir.get_sample_fn` takes this module as a denoiser.
    """

    full: Denoiser
    light: Denoiser
    switch: float

    def __post_init__(self):
        if self.full is self.light:  # one instance would be bound once, sharing its parameters
            object.__setattr__(self, "light", self.light.clone())
        super().__post_init__()

    @property
    def net(self):
        return self.light.net

    @property
    def input_shape(self):
        return self.light.input_shape

    @property
    def label_dim(self):
        return self.light.label_dim

    @nn.compact
    def __call__(self, x, sigma, class_labels=None, **kwargs):
        s = jnp.asarray(sigma, jnp.float32).reshape(-1)[0]
        if self.is_initializing():  # lax.cond needs both branches' parameters to exist
            full = self.full(x, sigma, class_labels, **kwargs)
            return jnp.where(s > self.switch, full, self.light(x, sigma, class_labels, **kwargs))
        return nn.cond(s > self.switch,
                       lambda m, x: m.full(x, sigma, class_labels, **kwargs),
                       lambda m, x: m.light(x, sigma, class_labels, **kwargs), self, x)


def get_multi_unet_fn(full_fn: Callable, light_fn: Callable, switch: float) -> Callable:
    """model_fn(x, t) for `difflax.sample` from two model functions: full_fn where t > switch."""

    def model_fn(x, t):
        s = jnp.asarray(t).reshape(-1)[0]
        return jax.lax.cond(s > switch, full_fn, light_fn, x, t)

    return model_fn
