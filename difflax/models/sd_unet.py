"""Stable Diffusion's UNet (LDM, Rombach et al. 2022, Sec. 3.3 and App. E) in Flax, NHWC, with
the layout and parameter names of diffusers' `UNet2DConditionModel` (SD 1.x and SD 2.x; also
SDXL's UNet, whose "text_time" embedding adds pooled-text and size conditioning to temb).

The forward pass is five stages, each a method usable on its own (feature-reuse plans and
Skip-Tuning work on them):

    embed_time  timesteps (B,) -> sinusoidal features -> MLP -> temb (B, 4 C0)
    encode      conv_in, then the down blocks; every ResNet(+transformer) layer's output and
                every down-sampler's output is a skip (`sd_skip_connections` lists them)
    middle      ResNet, transformer, ResNet at the lowest resolution
    decode      up blocks; each layer concatenates the last unused skip (times its skip scale,
                Skip-Tuning, Ma et al. 2024 Sec. 3) to its input; nearest 2x up-sampling
    output      GroupNorm, SiLU, conv_out -> the prediction (epsilon for SD 1.x, v for SD 2.x)

Attention ("transformer") layers follow diffusers' `Transformer2DModel`: GroupNorm, proj_in (a
1x1 conv in SD 1.x, a linear layer with `use_linear_projection`, SD 2.x; both are kept as
Dense kernels here), `BasicTransformerBlock`s (self-attention, cross-attention on the text
encoder's hidden states, GEGLU feed-forward, each after a LayerNorm, each residual), proj_out,
residual. `attention_head_dim` in diffusers' configs is the number of heads (diffusers issue
2011), and it is read as such here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax.models.unet import SkipConnection

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)
ADDITION_EMBED_TYPES = (None, "text_time")


@dataclasses.dataclass(frozen=True)
class SDUNetConfig:
    """The fields of a diffusers `UNet2DConditionModel` config.json that define the network;
    per-block fields are tuples with one entry per down block (`sd_unet_config_from_diffusers`
    expands diffusers' ints).

    attention_head_dim: the number of attention heads per block (diffusers' naming).
    addition_embed_type: None, or SDXL's "text_time" (Podell et al. 2023, Sec. 2.2): the
    pooled text embedding and the size/crop conditioning `time_ids` (each embedded like a
    timestep at addition_time_embed_dim) go through `add_embedding` into temb.
    sample_size: the latent resolution trained on (SD 1.5: 64); only the skip list's
    resolutions use it, the network runs at any size divisible by 2 ** (levels - 1).
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    attention_head_dim: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None


def _group_norm(config: SDUNetConfig, name: str, eps: float | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=config.norm_num_groups, use_fast_variance=False, name=name,
                        epsilon=config.norm_eps if eps is None else eps)


def _conv(features: int, name: str, kernel: int = 3, stride: int = 1) -> nn.Conv:
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


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D`: x + conv2(silu(norm2(conv1(silu(norm1(x))) + W silu(temb))))."""

    features: int
    config: SDUNetConfig

    @nn.compact
    def __call__(self, x, temb):
        h = _conv(self.features, "conv1")(nn.silu(_group_norm(self.config, "norm1")(x)))
        h = h + nn.Dense(self.features, name="time_emb_proj")(nn.silu(temb))[:, None, None]
        h = _conv(self.features, "conv2")(nn.silu(_group_norm(self.config, "norm2")(h)))
        if x.shape[-1] != self.features:
            x = _conv(self.features, "conv_shortcut", kernel=1)(x)
        return x + h


class Attention(nn.Module):
    """Multi-head attention of x (B, N, C) over context (B, M, D) (x itself if None)."""

    heads: int

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        b, n, c = x.shape
        split = lambda t: t.reshape(b, t.shape[1], self.heads, c // self.heads)
        q, k, v = (split(nn.Dense(c, use_bias=False, name=name)(inp))
                   for name, inp in (("to_q", x), ("to_k", context), ("to_v", context)))
        out = jax.nn.dot_product_attention(q, k, v).reshape(b, n, c)
        return nn.Dense(c, name="to_out_0")(out)


class TransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward."""

    heads: int

    @nn.compact
    def __call__(self, x, context):
        c = x.shape[-1]
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)
        x = x + Attention(self.heads, name="attn1")(ln("norm1")(x))
        x = x + Attention(self.heads, name="attn2")(ln("norm2")(x), context)
        # ff.net.0.proj and ff.net.2 in diffusers
        hidden, gate = jnp.split(nn.Dense(8 * c, name="ff_proj")(ln("norm3")(x)), 2, axis=-1)
        ff = nn.Dense(c, name="ff_out")(hidden * nn.gelu(gate, approximate=False))
        return x + ff


class SpatialTransformer(nn.Module):
    """diffusers `Transformer2DModel` on NHWC features, with a residual."""

    heads: int
    layers: int
    config: SDUNetConfig

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        y = _group_norm(self.config, "norm", eps=1e-6)(x).reshape(b, h * w, c)
        y = nn.Dense(c, name="proj_in")(y)
        for k in range(self.layers):
            y = TransformerBlock(self.heads, name=f"transformer_blocks_{k}")(y, context)
        return x + nn.Dense(c, name="proj_out")(y).reshape(x.shape)


class DownBlock(nn.Module):
    """`CrossAttnDownBlock2D` (attention) or `DownBlock2D`: returns (h, skips), one skip per
    layer and one for the down-sampler (a 3x3 stride-2 conv, padding 1)."""

    index: int
    config: SDUNetConfig

    @nn.compact
    def __call__(self, h, temb, context):
        cfg, i = self.config, self.index
        features = cfg.block_out_channels[i]
        skips = []
        for j in range(cfg.layers_per_block[i]):
            h = ResnetBlock(features, cfg, name=f"resnets_{j}")(h, temb)
            if cfg.down_block_types[i] == "CrossAttnDownBlock2D":
                h = SpatialTransformer(cfg.attention_head_dim[i], cfg.transformer_layers_per_block[i],
                                       cfg, name=f"attentions_{j}")(h, context)
            skips.append(h)
        if i < len(cfg.block_out_channels) - 1:
            h = _conv(features, "downsamplers_0_conv", stride=2)(h)
            skips.append(h)
        return h, tuple(skips)


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2DCrossAttn`: ResNet, transformer, ResNet."""

    config: SDUNetConfig

    @nn.compact
    def __call__(self, h, temb, context):
        cfg = self.config
        features = cfg.block_out_channels[-1]
        h = ResnetBlock(features, cfg, name="resnets_0")(h, temb)
        h = SpatialTransformer(cfg.attention_head_dim[-1], cfg.transformer_layers_per_block[-1],
                               cfg, name="attentions_0")(h, context)
        return ResnetBlock(features, cfg, name="resnets_1")(h, temb)


class UpBlock(nn.Module):
    """`CrossAttnUpBlock2D` or `UpBlock2D` number `index` (deepest first): each of its
    layers_per_block + 1 layers concatenates one skip (the last of `skips` first) to its
    input; then nearest 2x up-sampling and a 3x3 conv, except in the last block."""

    index: int
    config: SDUNetConfig

    @nn.compact
    def __call__(self, h, skips, temb, context):
        cfg, i = self.config, self.index
        level = len(cfg.block_out_channels) - 1 - i
        features = cfg.block_out_channels[level]
        for j, skip in enumerate(reversed(skips)):
            h = jnp.concatenate([h, skip], axis=-1)
            h = ResnetBlock(features, cfg, name=f"resnets_{j}")(h, temb)
            if cfg.up_block_types[i] == "CrossAttnUpBlock2D":
                h = SpatialTransformer(cfg.attention_head_dim[level],
                                       cfg.transformer_layers_per_block[level], cfg,
                                       name=f"attentions_{j}")(h, context)
        if level > 0:
            h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
            h = _conv(features, "upsamplers_0_conv")(h)
        return h


def sd_skip_connections(config: SDUNetConfig) -> tuple[SkipConnection, ...]:
    """The UNet's skip connections in encoder order, as (name, resolution at sample_size,
    channels): index 0 is conv_in's output (the "top"), the last the deepest down block's last
    layer (the "bottom"). Up block i consumes the skips of down block levels - 1 - i (and,
    for the last up block, conv_in's), last first; `skip_scales[k]` scales skip k."""
    skips = [SkipConnection("conv_in", config.sample_size, config.block_out_channels[0])]
    for i, ch in enumerate(config.block_out_channels):
        res = config.sample_size >> i
        skips += [SkipConnection(f"down_blocks_{i}_layer_{j}", res, ch)
                  for j in range(config.layers_per_block[i])]
        if i < len(config.block_out_channels) - 1:
            skips.append(SkipConnection(f"down_blocks_{i}_downsampler", res >> 1, ch))
    return tuple(skips)


def up_block_skip_indices(config: SDUNetConfig) -> tuple[tuple[int, ...], ...]:
    """For each up block (deepest first), the indices into `sd_skip_connections` it consumes,
    in encoder order (it consumes them last first)."""
    n = len(sd_skip_connections(config))
    levels = len(config.block_out_channels)
    out = []
    for i in range(levels):
        take = config.layers_per_block[levels - 1 - i] + 1
        out.append(tuple(range(n - take, n)))
        n -= take
    return tuple(out)


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: linear_1, SiLU, linear_2."""

    features: int

    @nn.compact
    def __call__(self, x):
        x = nn.silu(nn.Dense(self.features, name="linear_1")(x))
        return nn.Dense(self.features, name="linear_2")(x)


class SDUNet(nn.Module):
    """diffusers' `UNet2DConditionModel` (SD 1.x / 2.x) in Flax, NHWC.

    `__call__(latents (B, h, w, in_channels), timesteps (B,) or scalar, encoder_hidden_states
    (B, M, cross_attention_dim), skip_scales=None) -> (B, h, w, out_channels)`; h and w must be
    divisible by 2 ** (levels - 1). `skip_scales`: one scale per entry of
    `sd_skip_connections(config)` (a sequence or an array of that length), multiplying the
    skip where the decoder concatenates it (Skip-Tuning); None means all ones. With bfloat16
    latents and parameters everything but the time MLP (float32 sinusoidal features) computes
    in bfloat16.
    """

    config: SDUNetConfig

    def setup(self):
        cfg = self.config
        levels = len(cfg.block_out_channels)
        self.conv_in = _conv(cfg.block_out_channels[0], "conv_in")
        self.time_embedding = TimestepEmbedding(4 * cfg.block_out_channels[0])
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(4 * cfg.block_out_channels[0])
        self.down_blocks = [DownBlock(i, cfg) for i in range(levels)]
        self.mid_block = MidBlock(cfg) if cfg.mid_block_type else None
        self.up_blocks = [UpBlock(i, cfg) for i in range(levels)]
        self.conv_norm_out = _group_norm(cfg, "conv_norm_out")
        self.conv_out = _conv(cfg.out_channels, "conv_out")

    def __call__(self, latents, timesteps, encoder_hidden_states, skip_scales=None, *,
                 text_embeds=None, time_ids=None):
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        if latents.shape[1] % factor or latents.shape[2] % factor:
            raise ValueError(f"latents of size {latents.shape[1:3]}: height and width must be "
                             f"divisible by {factor} (2 ** (levels - 1))")
        # the time MLP sees float32 features; the rest computes in the latents' dtype
        temb = self.embed_time(timesteps, latents.shape[0], text_embeds, time_ids)
        temb = temb.astype(latents.dtype)
        h, skips = self.encode(latents, temb, encoder_hidden_states)
        h = self.middle(h, temb, encoder_hidden_states)
        h = self.decode(h, skips, temb, encoder_hidden_states, skip_scales)
        return self.output(h)

    def embed_time(self, timesteps, batch: int, text_embeds=None, time_ids=None):
        """timesteps (B,) or scalar (SD's discrete t in [0, 1000)) -> temb (B, 4 C0); with
        addition_embed_type "text_time", plus add_embedding([text_embeds, features(time_ids)])."""
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
        cfg = self.config
        feats = timestep_features(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                  cfg.freq_shift)
        temb = self.time_embedding(feats)
        if cfg.addition_embed_type != "text_time":
            return temb
        if text_embeds is None or time_ids is None:
            raise ValueError("this UNet (addition_embed_type 'text_time', SDXL) needs "
                             "text_embeds= and time_ids=")
        ids = timestep_features(jnp.ravel(time_ids), cfg.addition_time_embed_dim,
                                cfg.flip_sin_to_cos, cfg.freq_shift).reshape(batch, -1)
        return temb + self.add_embedding(jnp.concatenate([text_embeds, ids], axis=-1))

    def encode(self, latents, temb, context):
        """conv_in and the down blocks: -> (h, skips), skips in `sd_skip_connections` order."""
        h = self.conv_in(latents)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context)
            skips.extend(block_skips)
        return h, tuple(skips)

    def middle(self, h, temb, context):
        """The mid block (identity if mid_block_type is None)."""
        return h if self.mid_block is None else self.mid_block(h, temb, context)

    def decode(self, h, skips, temb, context, skip_scales=None):
        """The up blocks, consuming `skips` (each times its entry of `skip_scales`)."""
        if skip_scales is not None:
            if len(skip_scales) != len(skips):
                raise ValueError(f"skip_scales has {len(skip_scales)} entries; this UNet has "
                                 f"{len(skips)} skip connections (sd_skip_connections)")
            skips = tuple(s * skip_scales[k] for k, s in enumerate(skips))
        for block, indices in zip(self.up_blocks, up_block_skip_indices(self.config)):
            h = block(h, tuple(skips[k] for k in indices), temb, context)
        return h

    def output(self, h):
        """GroupNorm, SiLU, conv_out: the prediction (B, h, w, out_channels)."""
        return self.conv_out(nn.silu(self.conv_norm_out(h)))
