"""EDM's `SongUNet`: DDPM++ and NCSN++ (Song et al. 2021), as in NVlabs/edm `training/networks.py`.

Same blocks, same parameter names (`enc_16x16_conv` here is `enc.16x16_conv` there), NHWC.
The layers are built from the UNet's feature graph (`difflax.models.unet.feature_nodes`),
one per node, plus NCSN++'s aux layers; the forward pass (`EDMUNet.run`) computes one node
at a time (`compute_node`), dispatching on the node's kind and op.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from difflax.models.graph import FeatureNode
from difflax.models.layers import Conv2d, FourierEmbedding, GroupNorm, Init, Linear, positional_embedding
from difflax.models.unet import (EDMUNet, UNetConfig, augment_embedding, block_surgery, concat_skip,
                                 drop_labels, feature_nodes)
from difflax.models.unet_block import unet_block_class


def _level(node: FeatureNode) -> str:
    """The key prefix of the aux layers at the node's resolution, "16x16"."""
    return f"{node.resolution}x{node.resolution}"


def _has_output_layers(cfg: UNetConfig, node: FeatureNode) -> bool:
    """The node is the last decoder block of a level that has aux output layers (every level
    with decoder_type "skip", else the top one)."""
    return (node.kind == "decoder" and node.op == "block" and node.index == cfg.num_blocks
            and (cfg.decoder_type == "skip" or node.resolution == cfg.img_resolution))


def _has_aux_up(cfg: UNetConfig, node: FeatureNode) -> bool:
    """The level's aux output path upsamples the coarser level's (decoder_type "skip", every
    level but the bottom)."""
    bottom = cfg.img_resolution >> (len(cfg.channel_mult) - 1)
    return cfg.decoder_type == "skip" and node.resolution != bottom


class SongUNet(EDMUNet):
    """EDM `SongUNet`. x: (B, R, R, in_channels), noise_labels: (B,), class_labels: (B, label_dim)."""

    def setup(self):
        cfg = self.config
        init = Init("xavier_uniform")
        init_zero = Init("xavier_uniform", weight=1e-5)
        Block = unet_block_class(cfg.remat)
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

        enc, dec, caux = {}, {}, cfg.in_channels
        for node in feature_nodes(cfg):
            aux, cout = _level(node), node.channels
            if node.op == "conv":
                enc[node.module] = Conv2d(cout, 3, init=init)
            elif node.kind == "encoder":
                enc[node.module] = Block(cout, down=node.op == "down", **block,
                                             **block_surgery(cfg, node))
            elif node.kind != "output":
                dec[node.module] = Block(cout, up=node.op == "up", **block,
                                             **block_surgery(cfg, node))
            if node.op == "down" and cfg.encoder_type == "skip":
                enc[f"{aux}_aux_down"] = Conv2d(caux, 0, down=True, resample_filter=cfg.resample_filter)
                enc[f"{aux}_aux_skip"] = Conv2d(cout, 1, init=init)
            if node.op == "down" and cfg.encoder_type == "residual":
                enc[f"{aux}_aux_residual"] = Conv2d(cout, 3, down=True, resample_filter=cfg.resample_filter,
                                                    fused_resample=True, init=init)
                caux = cout
            if _has_output_layers(cfg, node):
                if _has_aux_up(cfg, node):
                    dec[f"{aux}_aux_up"] = Conv2d(cfg.out_channels, 0, up=True,
                                                  resample_filter=cfg.resample_filter)
                dec[f"{aux}_aux_norm"] = GroupNorm(eps=1e-6)
                dec[f"{aux}_aux_conv"] = Conv2d(cfg.out_channels, 3, init=init_zero)
        self.enc = enc
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
            labels = drop_labels(self, class_labels, cfg.label_dropout, train)
            emb = emb + self.map_label(labels * math.sqrt(cfg.label_dim))
        if cfg.augment_dim:
            emb = emb + augment_embedding(self, augment_labels, emb.shape[0])
        return nn.silu(self.map_layer1(nn.silu(self.map_layer0(emb))))

    def input_state(self, x):
        """The state entering the encoder: (x, aux), aux the image for NCSN++'s aux encoders."""
        return x, (None if self.config.encoder_type == "standard" else x)

    def compute_node(self, node, values, emb, scales, attention, train):
        """One node's value from its inputs' values: (h, aux) for blocks, F for "out".

        Returns (value, attention residual or None)."""
        if node.kind == "output":
            return values[node.inputs[0]][1], None
        h, aux = values[node.inputs[0]]
        if node.kind == "encoder":
            return self._encode(node, h, aux, emb, attention, train)
        if node.kind == "middle" and node.index == 0:
            aux = None  # the decoder's aux (output) path starts empty
        h = concat_skip(h, node, values, scales)
        h, attention = self.dec[node.module](h, emb, train, attention, True)
        if _has_output_layers(self.config, node):
            level = _level(node)
            if _has_aux_up(self.config, node):
                aux = self.dec[f"{level}_aux_up"](aux)
            tmp = self.dec[f"{level}_aux_conv"](nn.silu(self.dec[f"{level}_aux_norm"](h)))
            aux = tmp if aux is None else tmp + aux
        return (h, aux), attention

    def _encode(self, node, h, aux, emb, attention, train):
        """An encoder node: its layer, then at a downsampling node NCSN++'s aux encoder."""
        if node.op == "conv":
            return (self.enc[node.module](h), aux), None
        h, attention = self.enc[node.module](h, emb, train, attention, True)
        level = _level(node)
        if node.op == "down" and self.config.encoder_type == "skip":
            aux = self.enc[f"{level}_aux_down"](aux)
            h = h + self.enc[f"{level}_aux_skip"](aux)
        if node.op == "down" and self.config.encoder_type == "residual":
            h = aux = (h + self.enc[f"{level}_aux_residual"](aux)) / math.sqrt(2)
        return (h, aux), attention
