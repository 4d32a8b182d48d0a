"""The layers of Stable Diffusion's UNet (difflax.models.sd_unet), under diffusers'
`UNet2DConditionModel` names, NHWC.

The down, mid and up blocks expose one method per node of the UNet's feature graph
(`DownBlock.layer` / `downsample`, `MidBlock`, `UpBlock.layer` / `upsample`), so that
`SDUNet.compute_node` runs the network one node at a time; a transformer ("attention")
layer returns its residual, the cacheable attention unit of A-SDM's unit-level inheritance.
The blocks build their ResNets and transformers under the config's `surgery`
(`difflax.models.Surgery`, A-SDM's model assembly): a ResNet pruned or its branch replaced
(`resnet`), a transformer dropped or its self-attention replaced (`transformer`), by the
names `SDUNetConfig.block_params` and the feature graph give them.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax.models.layers import Init


def group_norm(config, name: str | None = None, eps: float | None = None) -> nn.GroupNorm:
    """diffusers' GroupNorm with the config's groups and epsilon (`name` only in compact code)."""
    return nn.GroupNorm(num_groups=config.norm_num_groups, use_fast_variance=False, name=name,
                        epsilon=config.norm_eps if eps is None else eps)


def conv(features: int, name: str | None = None, kernel: int = 3, stride: int = 1) -> nn.Conv:
    """A k x k convolution with padding k // 2, as torch's Conv2d(padding=k // 2)."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)),
                   name=name)


def timestep_features(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float):
    """diffusers' `get_timestep_embedding` (DDPM's sinusoidal embedding, Ho et al. 2020 App. B):
    timesteps (B,) -> (B, dim), frequencies exp(-ln(10^4) k / (dim / 2 - freq_shift)),
    [sin, cos] or [cos, sin] with flip_sin_to_cos."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: linear_1, SiLU, linear_2."""

    features: int

    @nn.compact
    def __call__(self, x):
        x = nn.silu(nn.Dense(self.features, name="linear_1")(x))
        return nn.Dense(self.features, name="linear_2")(x)


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D`: x + conv2(silu(norm2(conv1(silu(norm1(x))) + W silu(temb)))),
    x through the 1x1 `conv_shortcut` when the channels change.

    Surgery (`difflax.models.Surgery`, A-SDM's block pruning): `pruned=True` removes the
    residual branch and keeps the shortcut (identity or conv_shortcut); with a `branch` hook
    the block is shortcut(x) + branch(silu(norm1(x)), silu(temb), features, Init()) (the
    signature of `difflax.models.UNetBlock`'s hook; `Init()` is flax's default convolution
    initialisation, lecun normal, zero bias)."""

    features: int
    config: object
    pruned: bool = False
    branch: Callable | None = None

    @nn.compact
    def __call__(self, x, temb):
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = conv(self.features, "conv_shortcut", kernel=1)(x)
        if self.pruned:
            if self.branch is None:
                return shortcut
            h = nn.silu(group_norm(self.config, "norm1")(x))
            return shortcut + self.branch(h, nn.silu(temb), self.features, Init())
        h = conv(self.features, "conv1")(nn.silu(group_norm(self.config, "norm1")(x)))
        h = h + nn.Dense(self.features, name="time_emb_proj")(nn.silu(temb))[:, None, None]
        h = conv(self.features, "conv2")(nn.silu(group_norm(self.config, "norm2")(h)))
        return shortcut + h


class Attention(nn.Module):
    """Multi-head attention of x (B, N, C) over context (B, M, D) (x itself if None).

    `attend`, for self-attention on an h x w grid (`size` = (h, w)), replaces the softmax
    attention: attend(q, k, v, h, w) with q, k, v (B, h w, heads, c) in float32 -> (B, h w,
    heads, c) (the hook of `difflax.models.UNetBlock`, e.g. A-SDM's GRI attention)."""

    heads: int
    attend: Callable | None = None

    @nn.compact
    def __call__(self, x, context=None, size=None):
        self_attention = context is None
        context = x if context is None else context
        b, n, c = x.shape
        split = lambda t: t.reshape(b, t.shape[1], self.heads, c // self.heads)
        q, k, v = (split(nn.Dense(c, use_bias=False, name=name)(inp))
                   for name, inp in (("to_q", x), ("to_k", context), ("to_v", context)))
        if self.attend is not None and self_attention:
            f32 = lambda t: t.astype(jnp.float32)
            out = self.attend(f32(q), f32(k), f32(v), *size).astype(x.dtype).reshape(b, n, c)
        else:
            out = jax.nn.dot_product_attention(q, k, v).reshape(b, n, c)
        return nn.Dense(c, name="to_out_0")(out)


class TransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock`: self-attention (with the `attend` hook on the
    h x w grid `size`), cross-attention, GEGLU feed-forward."""

    heads: int
    attend: Callable | None = None

    @nn.compact
    def __call__(self, x, context, size):
        c = x.shape[-1]
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)
        x = x + Attention(self.heads, self.attend, name="attn1")(ln("norm1")(x), size=size)
        x = x + Attention(self.heads, name="attn2")(ln("norm2")(x), context)
        # ff.net.0.proj and ff.net.2 in diffusers
        hidden, gate = jnp.split(nn.Dense(8 * c, name="ff_proj")(ln("norm3")(x)), 2, axis=-1)
        ff = nn.Dense(c, name="ff_out")(hidden * nn.gelu(gate, approximate=False))
        return x + ff


class SpatialTransformer(nn.Module):
    """diffusers `Transformer2DModel` on NHWC features x (B, h, w, C), without its final
    residual: returns proj_out(blocks(proj_in(norm(x)))) (B, h, w, C), which the caller adds
    to x (the attention unit's residual). `attend`: the self-attention hook (`Attention`)."""

    heads: int
    layers: int
    config: object
    attend: Callable | None = None

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        y = group_norm(self.config, "norm", eps=1e-6)(x).reshape(b, h * w, c)
        y = nn.Dense(c, name="proj_in")(y)
        for k in range(self.layers):
            y = TransformerBlock(self.heads, self.attend, name=f"transformer_blocks_{k}")(
                y, context, (h, w))
        return nn.Dense(c, name="proj_out")(y).reshape(x.shape)


def resnet(config, features: int, name: str) -> ResnetBlock:
    """The ResnetBlock of prunable block `name` under `config.surgery` (pruned if it is in
    drop_blocks, with the surgery's branch hook)."""
    surgery = config.surgery
    return ResnetBlock(features, config, name in surgery.drop_blocks, surgery.branch)


def transformer(config, level: int, name: str) -> SpatialTransformer | None:
    """The transformer of feature node `name` at down level `level`, or None if
    `config.surgery` drops its attention unit."""
    surgery = config.surgery
    if name in surgery.drop_attention:
        return None
    return SpatialTransformer(config.attention_head_dim[level],
                              config.transformer_layers_per_block[level], config,
                              surgery.attention)


def attend(transformer, h, context, attention):
    """h plus the transformer's residual (taken from `attention` if given): (h, residual);
    (h, None) without a transformer."""
    if transformer is None:
        return h, None
    if attention is None:
        attention = transformer(h, context)
    return h + attention, attention


class DownBlock(nn.Module):
    """`CrossAttnDownBlock2D` (attention) or `DownBlock2D` number `index`: `layer(j, ...)` is
    ResNet j (and transformer j), `downsample` the 3x3 stride-2 conv (padding 1) of every
    block but the last."""

    index: int
    config: object

    def setup(self):
        cfg, i = self.config, self.index
        features, n = cfg.block_out_channels[i], cfg.layers_per_block[i]
        names = [f"down_blocks_{i}.layer_{j}" for j in range(n)]
        self.resnets = [resnet(cfg, features, name) for name in names]
        if cfg.down_block_types[i] == "CrossAttnDownBlock2D":
            self.attentions = [transformer(cfg, i, name) for name in names]
        if i < len(cfg.block_out_channels) - 1:
            self.downsamplers_0_conv = conv(features, stride=2)

    def layer(self, j, h, temb, context, attention=None):
        """(B, h, w, C_in) -> ((B, h, w, C), transformer residual or None)."""
        h = self.resnets[j](h, temb)
        cross = self.config.down_block_types[self.index] == "CrossAttnDownBlock2D"
        return attend(self.attentions[j] if cross else None, h, context, attention)

    def downsample(self, h):
        return self.downsamplers_0_conv(h)


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2DCrossAttn`: ResNet, transformer, ResNet. Returns (h, the
    transformer's residual), the residual taken from `attention` if given."""

    config: object

    def setup(self):
        cfg = self.config
        features = cfg.block_out_channels[-1]
        self.resnets = [resnet(cfg, features, f"mid_block.resnets_{k}") for k in range(2)]
        self.attentions = [transformer(cfg, len(cfg.block_out_channels) - 1, "mid_block")]

    def __call__(self, h, temb, context, attention=None):
        h, attention = attend(self.attentions[0], self.resnets[0](h, temb), context, attention)
        return self.resnets[1](h, temb), attention


class UpBlock(nn.Module):
    """`CrossAttnUpBlock2D` or `UpBlock2D` number `index` (deepest first): `layer(j, ...)`
    concatenates a skip to its input, then ResNet j (and transformer j); `upsample` is nearest
    2x up-sampling and a 3x3 conv, in every block but the last."""

    index: int
    config: object

    def setup(self):
        cfg, i = self.config, self.index
        level = len(cfg.block_out_channels) - 1 - i
        features = cfg.block_out_channels[level]
        n = cfg.layers_per_block[level] + 1
        names = [f"up_blocks_{i}.layer_{j}" for j in range(n)]
        self.resnets = [resnet(cfg, features, name) for name in names]
        if cfg.up_block_types[i] == "CrossAttnUpBlock2D":
            self.attentions = [transformer(cfg, level, name) for name in names]
        if level > 0:
            self.upsamplers_0_conv = conv(features)

    def layer(self, j, h, skip, temb, context, attention=None):
        """h (B, h, w, C_h), skip (B, h, w, C_s) -> ((B, h, w, C), transformer residual or None)."""
        h = self.resnets[j](jnp.concatenate([h, skip], axis=-1), temb)
        cross = self.config.up_block_types[self.index] == "CrossAttnUpBlock2D"
        return attend(self.attentions[j] if cross else None, h, context, attention)

    def upsample(self, h):
        return self.upsamplers_0_conv(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
