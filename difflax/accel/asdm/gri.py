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
(window >= H = W or 0, pool = 1): the two key sets are then the same N keys (duplicated keys with
their values do not change a softmax-weighted mean). `pool = 0` turns the global branch off
(regional attention only). A `GRIConfig` is the `attend` hook of `difflax.models.UNetBlock`:
`UNetBlock(attend=GRIConfig(...))` uses GRI attention in place of full attention with the
same projections (`norm2`, `qkv`, `proj`), so a GRI block takes a trained block's attention
weights unchanged.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

COMBINES = ("joint", "mean")


@dataclasses.dataclass(frozen=True)
class GRIConfig:
    """Layout of GRI attention: region side `window` (0, or >= the map: the whole map),
    key/value pooling factor `pool` (1 = no pooling, 0 = no global branch; capped at the
    map), and how the two `combine`. Feature maps are square."""

    window: int = 4
    pool: int = 2
    combine: str = "joint"

    def check(self, height: int, width: int) -> None:
        """Raises ValueError naming the valid choices for an H x W feature map."""
        if self.combine not in COMBINES:
            raise ValueError(f"unknown GRI combine {self.combine!r}; valid choices: "
                             f"{', '.join(map(repr, COMBINES))}")
        if height != width:
            raise ValueError(f"GRI attention takes square feature maps, not {height}x{width}")
        divisors = [d for d in range(1, height + 1) if height % d == 0]
        for name, value in (("window", self.window), ("pool", self.pool)):
            if value < 0 or (value and min(value, height) not in divisors):
                raise ValueError(f"GRI {name} {value} does not tile a {height}x{width} feature "
                                 f"map; valid choices: 0 or {divisors} (or any value >= {height})")

    def __call__(self, q, k, v, height: int, width: int):
        """`gri_attention` with this layout: the `attend` hook of `UNetBlock`."""
        return gri_attention(q, k, v, height, width, self)

    def window_at(self, size: int) -> int:
        """The region side on a size x size map: `window` capped at the map (0: the map)."""
        return min(self.window or size, size)


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
    w, p = config.window_at(height), min(config.pool, height)
    scale = 1 / math.sqrt(q.shape[-1])
    qw, kw, vw = (_windows(t, height, width, w) for t in (q, k, v))
    logits_r = jnp.einsum("bnqhc,bnkhc->bnhqk", qw, kw * scale)
    if not p:
        out = jnp.einsum("bnhqk,bnkhc->bnqhc", jax.nn.softmax(logits_r, axis=-1), vw)
        return _unwindow(out, height, width, w)
    kg, vg = (_pool(t, height, width, p) for t in (k, v))
    logits_g = jnp.einsum("bnqhc,bkhc->bnhqk", qw, kg * scale)
    if config.combine == "joint":
        probs = jax.nn.softmax(jnp.concatenate([logits_r, logits_g], axis=-1), axis=-1)
        p_r, p_g = probs[..., :logits_r.shape[-1]], probs[..., logits_r.shape[-1]:]
    else:
        p_r, p_g = jax.nn.softmax(logits_r, axis=-1) / 2, jax.nn.softmax(logits_g, axis=-1) / 2
    out = jnp.einsum("bnhqk,bnkhc->bnqhc", p_r, vw) + jnp.einsum("bnhqk,bkhc->bnqhc", p_g, vg)
    return _unwindow(out, height, width, w)
