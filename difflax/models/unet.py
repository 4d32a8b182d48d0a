"""The EDM paper's UNets in Flax: DDPM++ / NCSN++ (`SongUNet`) and ADM (`DhariwalUNet`).

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models"
(NeurIPS 2022), code NVlabs/edm `training/networks.py`. Same blocks, same parameter
names (`enc_16x16_conv` here is `enc.16x16_conv` there), NHWC layout.

Two additions serve the rest of difflax:
- the forward pass is split into `embed`, `encode` (encoder and middle blocks) and
  `decode`, so that encoder features can be cached and reused (Faster Diffusion,
  DeepCache, A-SDM feature inheritance);
- `skip_scales` multiplies each skip connection before the decoder concatenates it
  (Skip-Tuning, Ma et al. 2024). The skips are listed by `skip_connections(config)`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from difflax.models.layers import (Conv2d, FourierEmbedding, GroupNorm, Init, Linear, UNetBlock,
                                   positional_embedding)

MODEL_TYPES = ("SongUNet", "DhariwalUNet")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of a UNet, under EDM's constructor names.

    `model_type` is "SongUNet" (DDPM++ and NCSN++) or "DhariwalUNet" (ADM). The fields
    `embedding_type`, `channel_mult_noise`, `encoder_type`, `decoder_type` and
    `resample_filter` concern SongUNet only. The defaults are SongUNet's in EDM; `adm()`
    gives ADM's. Sequences are stored as tuples so that the config is hashable.
    """

    model_type: str = "SongUNet"
    img_resolution: int = 32
    in_channels: int = 3
    out_channels: int = 3
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.10
    label_dropout: float = 0.0
    embedding_type: str = "positional"
    channel_mult_noise: int = 1
    encoder_type: str = "standard"
    decoder_type: str = "standard"
    resample_filter: Sequence[int] = (1, 1)

    def __post_init__(self):
        for name in ("channel_mult", "attn_resolutions", "resample_filter"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        _check_choice("model_type", self.model_type, MODEL_TYPES)
        _check_choice("embedding_type", self.embedding_type, ("positional", "fourier"))
        _check_choice("encoder_type", self.encoder_type, ("standard", "skip", "residual"))
        _check_choice("decoder_type", self.decoder_type, ("standard", "skip"))
        _check_choice("resample_filter", self.resample_filter, ((1, 1), (1, 3, 3, 1)))
        if not self.channel_mult:
            raise ValueError("channel_mult must name at least one resolution level")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.img_resolution % factor:
            raise ValueError(
                f"img_resolution {self.img_resolution} is not divisible by {factor}, as "
                f"{len(self.channel_mult)} levels (channel_mult={list(self.channel_mult)}) need; "
                f"valid resolutions are multiples of {factor}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(repr, choices))}")


def ddpmpp(**kwargs) -> UNetConfig:
    """DDPM++ as in EDM's config (positional embedding, standard encoder, filter [1,1])."""
    return UNetConfig(**{"model_type": "SongUNet", "embedding_type": "positional",
                         "encoder_type": "standard", "decoder_type": "standard",
                         "channel_mult_noise": 1, "resample_filter": (1, 1), **kwargs})


def ncsnpp(**kwargs) -> UNetConfig:
    """NCSN++ as in EDM's config (Fourier embedding, residual encoder, filter [1,3,3,1])."""
    return UNetConfig(**{"model_type": "SongUNet", "embedding_type": "fourier",
                         "encoder_type": "residual", "decoder_type": "standard",
                         "channel_mult_noise": 2, "resample_filter": (1, 3, 3, 1), **kwargs})


def adm(**kwargs) -> UNetConfig:
    """ADM (Dhariwal & Nichol 2021) with EDM's `DhariwalUNet` defaults."""
    return UNetConfig(**{"model_type": "DhariwalUNet", "model_channels": 192,
                         "channel_mult": (1, 2, 3, 4), "num_blocks": 3,
                         "attn_resolutions": (32, 16, 8), **kwargs})


class SkipConnection(NamedTuple):
    """One skip connection: the encoder block that produces it, its resolution and channels."""

    name: str
    resolution: int
    channels: int


def skip_connections(config: UNetConfig) -> tuple[SkipConnection, ...]:
    """The UNet's skip connections in encoder order.

    Index 0 is the first convolution's output at full resolution (the "top"), the last
    index the deepest encoder block (the "bottom"). The decoder consumes them in reverse
    order: its first block concatenates the last skip. `skip_scales[i]` scales skip i.
    """
    skips = []
    cout = config.in_channels
    for level, mult in enumerate(config.channel_mult):
        res = config.img_resolution >> level
        if level == 0:
            cout = config.model_channels * (1 if config.model_type == "SongUNet" else mult)
            skips.append(SkipConnection(f"{res}x{res}_conv", res, cout))
        else:
            skips.append(SkipConnection(f"{res}x{res}_down", res, cout))
        for idx in range(config.num_blocks):
            cout = config.model_channels * mult
            skips.append(SkipConnection(f"{res}x{res}_block{idx}", res, cout))
    return tuple(skips)


@flax.struct.dataclass
class UNetFeatures:
    """What the encoder hands to the decoder: the skips (encoder order) and the middle output.

    skips: tuple of (B, H_i, W_i, C_i); h: (B, H_min, W_min, C) after the middle blocks.
    """

    skips: tuple
    h: jax.Array


def _scaled(skip, scale):
    return skip if scale is None else skip * jnp.asarray(scale, skip.dtype)


def _check_skip_scales(skip_scales, n):
    if skip_scales is None:
        return (None,) * n
    if len(skip_scales) != n:
        raise ValueError(f"skip_scales has {len(skip_scales)} entries but the UNet has {n} skip "
                         "connections; list them with difflax.models.skip_connections(config)")
    return tuple(skip_scales[i] for i in range(n))


# ----------------------------------------------------------------------------
# DDPM++ and NCSN++.


class SongUNet(nn.Module):
    """EDM `SongUNet`. x: (B, R, R, in_channels), noise_labels: (B,), class_labels: (B, label_dim)."""

    config: UNetConfig

    def setup(self):
        cfg = self.config
        init = Init("xavier_uniform")
        init_zero = Init("xavier_uniform", weight=1e-5)
        block = dict(num_heads=1, dropout=cfg.dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=cfg.resample_filter, resample_proj=True,
                     adaptive_scale=False, init=init, init_zero=init_zero,
                     init_attn=Init("xavier_uniform", weight=math.sqrt(0.2)))
        emb_channels = cfg.model_channels * cfg.channel_mult_emb
        noise_channels = cfg.model_channels * cfg.channel_mult_noise
        if cfg.embedding_type == "fourier":
            self.map_noise = FourierEmbedding(noise_channels)
        if cfg.label_dim:
            self.map_label = Linear(noise_channels, init=init)
        if cfg.augment_dim:
            self.map_augment = Linear(noise_channels, use_bias=False, init=init)
        self.map_layer0 = Linear(emb_channels, init=init)
        self.map_layer1 = Linear(emb_channels, init=init)

        enc = {}
        cout, caux = cfg.in_channels, cfg.in_channels
        for level, mult in enumerate(cfg.channel_mult):
            res = cfg.img_resolution >> level
            if level == 0:
                cout = cfg.model_channels
                enc[f"{res}x{res}_conv"] = Conv2d(cout, 3, init=init)
            else:
                enc[f"{res}x{res}_down"] = UNetBlock(cout, down=True, **block)
                if cfg.encoder_type == "skip":
                    enc[f"{res}x{res}_aux_down"] = Conv2d(caux, 0, down=True,
                                                          resample_filter=cfg.resample_filter)
                    enc[f"{res}x{res}_aux_skip"] = Conv2d(cout, 1, init=init)
                if cfg.encoder_type == "residual":
                    enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        cout, 3, down=True, resample_filter=cfg.resample_filter,
                        fused_resample=True, init=init)
                    caux = cout
            for idx in range(cfg.num_blocks):
                cout = cfg.model_channels * mult
                enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cout, attention=res in cfg.attn_resolutions, **block)
        self.enc = enc

        dec = {}
        levels = len(cfg.channel_mult)
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = cfg.img_resolution >> level
            if level == levels - 1:
                dec[f"{res}x{res}_in0"] = UNetBlock(cout, attention=True, **block)
                dec[f"{res}x{res}_in1"] = UNetBlock(cout, **block)
            else:
                dec[f"{res}x{res}_up"] = UNetBlock(cout, up=True, **block)
            for idx in range(cfg.num_blocks + 1):
                cout = cfg.model_channels * mult
                attn = idx == cfg.num_blocks and res in cfg.attn_resolutions
                dec[f"{res}x{res}_block{idx}"] = UNetBlock(cout, attention=attn, **block)
            if cfg.decoder_type == "skip" or level == 0:
                if cfg.decoder_type == "skip" and level < levels - 1:
                    dec[f"{res}x{res}_aux_up"] = Conv2d(cfg.out_channels, 0, up=True,
                                                        resample_filter=cfg.resample_filter)
                dec[f"{res}x{res}_aux_norm"] = GroupNorm(eps=1e-6)
                dec[f"{res}x{res}_aux_conv"] = Conv2d(cfg.out_channels, 3, init=init_zero)
        self.dec = dec

    def embed(self, noise_labels, class_labels=None, augment_labels=None, train=False):
        """Noise (+ label, augment) embedding, (B,) -> (B, emb_channels)."""
        cfg = self.config
        noise_channels = cfg.model_channels * cfg.channel_mult_noise
        if cfg.embedding_type == "fourier":
            emb = self.map_noise(noise_labels)
        else:
            emb = positional_embedding(noise_labels, noise_channels, endpoint=True)
        emb = jnp.concatenate([emb[:, noise_channels // 2:], emb[:, :noise_channels // 2]], 1)
        if cfg.label_dim:
            labels = _drop_labels(self, class_labels, cfg.label_dropout, train)
            emb = emb + self.map_label(labels * math.sqrt(cfg.label_dim))
        if cfg.augment_dim and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return nn.silu(self.map_layer1(nn.silu(self.map_layer0(emb))))

    def encode(self, x, emb, train=False) -> UNetFeatures:
        """Encoder and middle blocks: x (B, R, R, C_in) -> UNetFeatures."""
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb, train) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        return _middle(self, x, skips, emb, train)

    def decode(self, features: UNetFeatures, emb, skip_scales=None, train=False):
        """Decoder from cached features -> (B, R, R, out_channels)."""
        scales = _check_skip_scales(skip_scales, len(features.skips))
        pending = list(zip(features.skips, scales))
        x, aux, tmp = features.h, None, None
        for name, block in self.dec.items():
            if "_in" in name:
                continue
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(nn.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if "_block" in name:
                    x = jnp.concatenate([x, _scaled(*pending.pop())], axis=-1)
                x = block(x, emb, train)
        return aux

    def __call__(self, x, noise_labels, class_labels=None, *, skip_scales=None,
                 augment_labels=None, train=False):
        return _forward(self, x, noise_labels, class_labels, skip_scales, augment_labels, train)


def _forward(unet, x, noise_labels, class_labels, skip_scales, augment_labels, train):
    """embed -> encode -> decode: (B, R, R, C_in) -> (B, R, R, C_out)."""
    emb = unet.embed(noise_labels, class_labels, augment_labels, train)
    return unet.decode(unet.encode(x, emb, train), emb, skip_scales, train)


def _middle(unet, x, skips, emb, train) -> UNetFeatures:
    """The middle blocks (EDM's `in0`, `in1`, at the lowest resolution) close the encoder."""
    for name, block in unet.dec.items():
        if "_in" in name:
            x = block(x, emb, train)
    return UNetFeatures(skips=tuple(skips), h=x)


def _drop_labels(module, class_labels, rate, train):
    """Classifier-free-guidance label dropout: zero each sample's label with probability `rate`."""
    if not (train and rate):
        return class_labels
    keep = jax.random.uniform(module.make_rng("dropout"), (class_labels.shape[0], 1)) >= rate
    return class_labels * keep.astype(class_labels.dtype)


# ----------------------------------------------------------------------------
# ADM.


class DhariwalUNet(nn.Module):
    """EDM `DhariwalUNet` (ADM). x: (B, R, R, in_channels), noise_labels: (B,)."""

    config: UNetConfig

    def setup(self):
        cfg = self.config
        init = Init("kaiming_uniform", weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
        init_zero = Init("kaiming_uniform", weight=0.0, bias=0.0)
        block = dict(channels_per_head=64, dropout=cfg.dropout, init=init, init_zero=init_zero)
        emb_channels = cfg.model_channels * cfg.channel_mult_emb
        if cfg.augment_dim:
            self.map_augment = Linear(cfg.model_channels, use_bias=False, init=init_zero)
        self.map_layer0 = Linear(emb_channels, init=init)
        self.map_layer1 = Linear(emb_channels, init=init)
        if cfg.label_dim:
            self.map_label = Linear(emb_channels, use_bias=False,
                                    init=Init("kaiming_normal", weight=math.sqrt(cfg.label_dim)))
        enc = {}
        for level, mult in enumerate(cfg.channel_mult):
            res = cfg.img_resolution >> level
            cout = cfg.model_channels * mult
            if level == 0:
                enc[f"{res}x{res}_conv"] = Conv2d(cout, 3, init=init)
            else:
                enc[f"{res}x{res}_down"] = UNetBlock(enc_channels, down=True, **block)
            for idx in range(cfg.num_blocks):
                enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cout, attention=res in cfg.attn_resolutions, **block)
            enc_channels = cout
        self.enc = enc
        dec = {}
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = cfg.img_resolution >> level
            if level == len(cfg.channel_mult) - 1:
                dec[f"{res}x{res}_in0"] = UNetBlock(enc_channels, attention=True, **block)
                dec[f"{res}x{res}_in1"] = UNetBlock(enc_channels, **block)
            else:
                dec[f"{res}x{res}_up"] = UNetBlock(enc_channels, up=True, **block)
            enc_channels = cfg.model_channels * mult
            for idx in range(cfg.num_blocks + 1):
                dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    enc_channels, attention=res in cfg.attn_resolutions, **block)
        self.dec = dec
        self.out_norm = GroupNorm()
        self.out_conv = Conv2d(cfg.out_channels, 3, init=init_zero)

    def embed(self, noise_labels, class_labels=None, augment_labels=None, train=False):
        """Noise (+ augment, label) embedding, (B,) -> (B, emb_channels)."""
        cfg = self.config
        emb = positional_embedding(noise_labels, cfg.model_channels)
        if cfg.augment_dim and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(nn.silu(self.map_layer0(emb)))
        if cfg.label_dim:
            emb = emb + self.map_label(_drop_labels(self, class_labels, cfg.label_dropout, train))
        return nn.silu(emb)

    def encode(self, x, emb, train=False) -> UNetFeatures:
        """Encoder and middle blocks: x (B, R, R, C_in) -> UNetFeatures."""
        skips = []
        for block in self.enc.values():
            x = block(x, emb, train) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        return _middle(self, x, skips, emb, train)

    def decode(self, features: UNetFeatures, emb, skip_scales=None, train=False):
        """Decoder from cached features -> (B, R, R, out_channels)."""
        scales = _check_skip_scales(skip_scales, len(features.skips))
        pending = list(zip(features.skips, scales))
        x = features.h
        for name, block in self.dec.items():
            if "_in" in name:
                continue
            if "_block" in name:
                x = jnp.concatenate([x, _scaled(*pending.pop())], axis=-1)
            x = block(x, emb, train)
        return self.out_conv(nn.silu(self.out_norm(x)))

    def __call__(self, x, noise_labels, class_labels=None, *, skip_scales=None,
                 augment_labels=None, train=False):
        return _forward(self, x, noise_labels, class_labels, skip_scales, augment_labels, train)


def make_unet(config: UNetConfig) -> nn.Module:
    """The UNet module for `config.model_type`."""
    return {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}[config.model_type](config)
