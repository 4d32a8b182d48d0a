"""GRI attention: global attention over pooled keys/values plus regional (windowed) attention.

A-SDM (Zhu et al., "A-SDM: Accelerating Stable Diffusion through Redundancy Removal and
Performance Optimization", 2023/2024, Sec. "global-regional interactive attention") replaces
full self-attention over N = H W tokens, O(N^2), by two cheaper interactions:

- regional: each query attends to the keys of its own `window` x `window` region
  (non-overlapping windows, as in Swin / Twins' locally-grouped attention), O(N w^2);
- global: each query attends to keys and values average-pooled by `pool` x `pool`
  (Twins' global sub-sampled attention, PVT's spatial reduction), O(N^2 / p^2).

The paper gives no code and no exact layout, so the combination is a choice (`combine`):

- "joint": one softmax over the union of the region's keys and the pooled keys (the two
  interactions compete for attention mass; no extra parameters);
- "mean": the average of the two attentions' outputs, each with its own softmax.

Both reduce to full self-attention when one region covers the image and there is no pooling
(window = H = W, pool = 1): the two key sets are then the same N keys (duplicated keys with
their values do not change a softmax-weighted mean). `pool = 0` turns the global branch off
(regional attention only). The projections (`norm2`, `qkv`, `proj`) and EDM's channel layout
are those of `difflax.models.layers.UNetBlock`, so a GRI block takes a trained block's
attention weights unchanged.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax.models.layers import Conv2d, GroupNorm, Init

COMBINES = ("joint", "mean")


@dataclasses.dataclass(frozen=True)
class GRIConfig:
    """Layout of GRI attention: region side `window` (0 = the whole image), key/value pooling
    factor `pool` (1 = no pooling, 0 = no global branch), and how the two `combine`."""

    window: int = 4
    pool: int = 2
    combine: str = "joint"

    def check(self, height: int, width: int) -> None:
        """Raises ValueError naming the valid choices for an H x W feature map."""
        if self.combine not in COMBINES:
            raise ValueError(f"unknown GRI combine {self.combine!r}; valid choices: "
                             f"{', '.join(map(repr, COMBINES))}")
        divisors = [d for d in range(1, min(height, width) + 1) if height % d == 0 and width % d == 0]
        for name, value, extra in (("window", self.window, [0]), ("pool", self.pool, [0])):
            if value not in extra + divisors:
                raise ValueError(f"GRI {name} {value} does not tile a {height}x{width} feature "
                                 f"map; valid choices: {extra + divisors}")
        if self.window == 0 and height != width:
            raise ValueError(f"GRI window 0 (the whole image) needs a square map, not {height}x{width}")


def _windows(t, height, width, w):
    """(B, H W, heads, c) -> (B, n_windows, w w, heads, c)."""
    b, _, heads, c = t.shape
    t = t.reshape(b, height // w, w, width // w, w, heads, c).transpose(0, 1, 3, 2, 4, 5, 6)
    return t.reshape(b, (height // w) * (width // w), w * w, heads, c)


def _unwindow(t, height, width, w):
    b, _, _, heads, c = t.shape
    t = t.reshape(b, height // w, width // w, w, w, heads, c).transpose(0, 1, 3, 2, 4, 5, 6)
    return t.reshape(b, height * width, heads, c)


def _pool(t, height, width, p):
    """Average-pools tokens (B, H W, heads, c) over p x p -> (B, H W / p^2, heads, c)."""
    b, _, heads, c = t.shape
    t = t.reshape(b, height // p, p, width // p, p, heads, c).mean((2, 4))
    return t.reshape(b, -1, heads, c)


def gri_attention(q, k, v, height: int, width: int, config: GRIConfig = GRIConfig()):
    """Global-regional attention of q, k, v (B, H W, heads, c) on an H x W grid -> same shape.

    Logits are q.k / sqrt(c), as in `UNetBlock`. Computed in the inputs' dtype.
    """
    config.check(height, width)
    w = config.window or height
    scale = 1 / math.sqrt(q.shape[-1])
    qw, kw, vw = (_windows(t, height, width, w) for t in (q, k, v))
    logits_r = jnp.einsum("bnqhc,bnkhc->bnhqk", qw, kw * scale)
    if not config.pool:
        out = jnp.einsum("bnhqk,bnkhc->bnqhc", jax.nn.softmax(logits_r, axis=-1), vw)
        return _unwindow(out, height, width, w)
    kg, vg = (_pool(t, height, width, config.pool) for t in (k, v))
    logits_g = jnp.einsum("bnqhc,bkhc->bnhqk", qw, kg * scale)
    if config.combine == "joint":
        p = jax.nn.softmax(jnp.concatenate([logits_r, logits_g], axis=-1), axis=-1)
        p_r, p_g = p[..., :logits_r.shape[-1]], p[..., logits_r.shape[-1]:]
    else:
        p_r, p_g = jax.nn.softmax(logits_r, axis=-1) / 2, jax.nn.softmax(logits_g, axis=-1) / 2
    out = jnp.einsum("bnhqk,bnkhc->bnqhc", p_r, vw) + jnp.einsum("bnhqk,bkhc->bnqhc", p_g, vg)
    return _unwindow(out, height, width, w)


class GRIAttention(nn.Module):
    """The attention half of a `UNetBlock` with GRI attention: x (B, H, W, C) -> (B, H, W, C).

    Returns proj(attention(qkv(norm2(x)))), without the residual; `UNetBlock` adds x and
    multiplies by its skip_scale. Heads: `num_heads`, or C // `channels_per_head`.
    """

    config: GRIConfig = GRIConfig()
    num_heads: int | None = None
    channels_per_head: int = 64
    eps: float = 1e-5
    init_attn: Init = Init()
    init_zero: Init = Init(weight=0.0)

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        heads = self.num_heads if self.num_heads is not None else c // self.channels_per_head
        qkv = Conv2d(3 * c, 1, init=self.init_attn, name="qkv")(GroupNorm(eps=self.eps, name="norm2")(x))
        qkv = qkv.reshape(b, h * w, heads, c // heads, 3).astype(jnp.float32)
        a = gri_attention(qkv[..., 0], qkv[..., 1], qkv[..., 2], h, w, self.config)
        return Conv2d(c, 1, init=self.init_zero, name="proj")(a.reshape(b, h, w, c).astype(x.dtype))
