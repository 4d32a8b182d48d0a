"""EDM's `UNetBlock` (Karras et al. 2022, NVlabs/edm `training/networks.py`), with generic
surgery hooks: the residual branch removed or replaced by any function, the softmax attention
replaced by any function (A-SDM's CondConv and GRI attention, difflax.accel.asdm, are two).

It builds on the layers of `difflax.models.layers`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax.models.layers import Conv2d, GroupNorm, Init, Linear, downsample, upsample


class UNetBlock(nn.Module):
    """EDM `UNetBlock`: the union of the DDPM++, NCSN++ and ADM residual blocks.

    x -> conv0(silu(norm0(x))) -> (adaptive) scale/shift by the embedding -> silu ->
    dropout -> conv1, plus the (projected, resampled) input, times `skip_scale`; then
    optional self-attention with `num_heads` heads, again times `skip_scale`.
    x: (B, H, W, C_in), emb: (B, E) -> (B, H', W', C_out).

    The attention unit's residual, proj(attn(norm2(x))), can be taken from a cache
    (`attention=`, A-SDM's unit-level feature inheritance) and returned for caching
    (`with_attention=True` returns (out, residual), residual None without attention).

    Surgery (`difflax.models.Surgery`, used by A-SDM's model assembly, difflax.accel.asdm):
    `pruned=True` removes the residual branch, leaving the shortcut alone (identity or the
    1x1 projection, with resampling; no `skip_scale`, as there is no sum left to normalise);
    with a `branch` the removed branch is replaced by branch(h, emb, C_out, init) -> (B, H',
    W', C_out), where h = silu(norm0(x)) resampled as the block resamples (B, H', W', C_in)
    (the removed branch's first layers, whose norm is kept) and `init` the block's `Init`;
    it is called inside the block (the layers it creates are the block's), added to the
    shortcut and times `skip_scale`. `attend(q, k, v, height, width)` (q, k, v: (B, H W,
    heads, c) in float32) -> (B, H W, heads, c) replaces the softmax attention, with the same
    projections (`norm2`, `qkv`, `proj`). Hooks are hashable callables (frozen dataclasses).
    """

    out_channels: int
    up: bool = False
    down: bool = False
    attention: bool = False
    num_heads: int | None = None
    channels_per_head: int = 64
    dropout: float = 0.0
    skip_scale: float = 1.0
    eps: float = 1e-5
    resample_filter: Sequence[int] = (1, 1)
    resample_proj: bool = False
    adaptive_scale: bool = True
    init: Init = Init()
    init_zero: Init = Init(weight=0.0)
    init_attn: Init | None = None
    pruned: bool = False
    branch: Callable | None = None
    attend: Callable | None = None

    @nn.compact
    def __call__(self, x, emb, train: bool = False, attention=None, with_attention=False):
        cout = self.out_channels
        resample = dict(up=self.up, down=self.down, resample_filter=self.resample_filter)
        orig = x
        if self.pruned:
            return self._pruned(x, emb, attention, with_attention)
        x = Conv2d(cout, 3, init=self.init, name="conv0", **resample)(
            nn.silu(GroupNorm(eps=self.eps, name="norm0")(x)))
        params = Linear(cout * (2 if self.adaptive_scale else 1), init=self.init, name="affine")(emb)
        params = params[:, None, None, :].astype(x.dtype)
        norm1 = GroupNorm(eps=self.eps, name="norm1")
        if self.adaptive_scale:
            scale, shift = jnp.split(params, 2, axis=-1)
            x = nn.silu(shift + norm1(x) * (scale + 1))
        else:
            x = nn.silu(norm1(x + params))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = Conv2d(cout, 3, init=self.init_zero, name="conv1")(x)
        x = (x + self._shortcut(orig)) * self.skip_scale
        return self._attention_unit(x, attention, with_attention)

    def _shortcut(self, x):
        cin, cout = x.shape[-1], self.out_channels
        if cout != cin or self.up or self.down:
            kernel = 1 if self.resample_proj or cout != cin else 0
            x = Conv2d(cout, kernel, init=self.init, name="skip", up=self.up, down=self.down,
                       resample_filter=self.resample_filter)(x)
        return x

    def _attention_unit(self, x, attention, with_attention):
        if self.attention:
            if attention is None:
                attention = self._attend(x)
            x = (attention + x) * self.skip_scale
        return (x, attention) if with_attention else x

    def _pruned(self, x, emb, attention, with_attention):
        """The block with its residual branch removed, or replaced by `branch`."""
        out = self._shortcut(x)
        if self.branch is not None:
            h = nn.silu(GroupNorm(eps=self.eps, name="norm0")(x))
            h = upsample(h, self.resample_filter) if self.up else h
            h = downsample(h, self.resample_filter) if self.down else h
            out = (self.branch(h, emb, self.out_channels, self.init) + out) * self.skip_scale
        return self._attention_unit(out, attention, with_attention)

    def _attend(self, x):
        b, h, w, c = x.shape
        heads = self.num_heads if self.num_heads is not None else c // self.channels_per_head
        if heads == 0 or c % heads:
            raise ValueError(f"attention over {c} channels with {heads} heads (channels_per_head="
                             f"{self.channels_per_head}): the heads must divide the channels (EDM's "
                             "code fails here too)")
        qkv = Conv2d(3 * c, 1, init=self.init_attn or self.init, name="qkv")(
            GroupNorm(eps=self.eps, name="norm2")(x))
        # EDM's channel layout of qkv is (head, channel, {q, k, v}).
        qkv = qkv.reshape(b, h * w, heads, c // heads, 3).astype(jnp.float32)
        q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
        if self.attend is not None:
            a = self.attend(q, k, v, h, w)
        else:
            logits = jnp.einsum("bqhc,bkhc->bhqk", q, k / math.sqrt(c // heads))
            a = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1), v)
        a = a.reshape(b, h, w, c).astype(x.dtype)
        return Conv2d(c, 1, init=self.init_zero, name="proj")(a)


# UNetBlock with jax.checkpoint: its activations are recomputed in the backward pass instead
# of stored (less memory for training, one more forward pass of the block); `train` and
# `with_attention` (positional arguments 3 and 5, self being 0) are static.
RematUNetBlock = nn.remat(UNetBlock, static_argnums=(3, 5))


def unet_block_class(remat: bool) -> type:
    """`RematUNetBlock` if `remat` (UNetConfig.remat) else `UNetBlock`; the parameters are the
    same either way."""
    return RematUNetBlock if remat else UNetBlock
