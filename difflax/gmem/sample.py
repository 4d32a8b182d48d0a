"""GMem's sampling (GMem Sec. 3-4): SiT's probability-flow ODE conditioned on snippets drawn
from the bank, encoded from new images, or interpolated between snippets (`bank.slerp`, ...).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from difflax.gmem.bank import MemoryBank, sample_entries
from difflax.interpolants import get_sit_fn, sample_ode


def get_draw_fn(model, *, interpolant: str = "linear", prediction: str = "velocity",
                method: str = "heun", steps: int = 50, cfg_scale: float = 1.0,
                clip: bool = True):
    """Jitted draw(params, noise (B, ...), y (B,) | None, snippet (B, D) | None) -> samples
    (B, ...) clipped to [-1, 1] (images; `clip=False` for latents): `difflax.interpolants.
    sample_ode` of a `difflax.models.SiT` conditioned on labels y and / or snippets
    (`get_sit_fn`, guidance `cfg_scale`); compiled once per shape."""

    @jax.jit
    def draw(params, noise, y, snippet):
        fn = get_sit_fn(model, {"params": params}, y=y, snippet=snippet, cfg_scale=cfg_scale)
        x, _ = sample_ode(fn, noise, interpolant=interpolant, prediction=prediction,
                          method=method, steps=steps)
        return jnp.clip(x, -1, 1) if clip else x

    return draw


def sample_from_bank(draw, params, bank: MemoryBank, key: jax.Array, num: int,
                     shape: tuple[int, ...], *, by: str = "uniform") -> tuple[jax.Array, jax.Array]:
    """(samples (num, *shape), entries (num,)): noise from split(key)[0], `num` bank entries
    drawn from split(key)[1] (`sample_entries`, uniformly or by frequency), each sample
    conditioned on its entry's snippet (GMem Sec. 3, sampling)."""
    k_noise, k_cond = jax.random.split(key)
    noise = jax.random.normal(k_noise, (num, *shape))
    idx = sample_entries(bank, k_cond, num, by=by)
    return draw(params, noise, None, bank.lookup(idx)), idx
