"""EDM's `DhariwalUNet`: ADM (Dhariwal & Nichol 2021), as in NVlabs/edm `training/networks.py`.

Same blocks, same parameter names (`enc_32x32_conv` here is `enc.32x32_conv` there), NHWC.
The layers are built from the UNet's feature graph (`difflax.models.unet.feature_nodes`),
one per node; the forward pass (`EDMUNet.run`) computes one node at a time (`compute_node`).
"""
from __future__ import annotations

import math

import flax.linen as nn

from difflax.models.layers import Conv2d, GroupNorm, Init, Linear, positional_embedding
from difflax.models.unet import (EDMUNet, augment_embedding, block_surgery, concat_skip, drop_labels,
                                 feature_nodes)
from difflax.models.unet_block import unet_block_class


class DhariwalUNet(EDMUNet):
    """EDM `DhariwalUNet` (ADM). x: (B, R, R, in_channels), noise_labels: (B,)."""

    def setup(self):
        cfg = self.config
        init = Init("kaiming_uniform", weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
        init_zero = Init("kaiming_uniform", weight=0.0, bias=0.0)
        Block = unet_block_class(cfg.remat)
        block = dict(channels_per_head=64, dropout=cfg.dropout, init=init, init_zero=init_zero)
        emb_channels = cfg.model_channels * cfg.channel_mult_emb
        if cfg.augment_dim:
            self.map_augment = Linear(cfg.model_channels, use_bias=False, init=init_zero)
        self.map_layer0 = Linear(emb_channels, init=init)
        self.map_layer1 = Linear(emb_channels, init=init)
        if cfg.label_dim:
            self.map_label = Linear(emb_channels, use_bias=False,
                                    init=Init("kaiming_normal", weight=math.sqrt(cfg.label_dim)))
        enc, dec = {}, {}
        for node in feature_nodes(cfg):
            table = enc if node.kind == "encoder" else dec
            if node.op == "conv":
                table[node.module] = Conv2d(node.channels, 3, init=init)
            elif node.kind != "output":
                table[node.module] = Block(node.channels, up=node.op == "up",
                                               down=node.op == "down", **block,
                                               **block_surgery(cfg, node))
        self.enc = enc
        self.dec = dec
        self.out_norm = GroupNorm()
        self.out_conv = Conv2d(cfg.out_channels, 3, init=init_zero)

    def embed(self, noise_labels, class_labels=None, augment_labels=None, train=False):
        """Noise (+ augment, label) embedding, (B,) -> (B, emb_channels)."""
        cfg = self.config
        emb = positional_embedding(noise_labels, cfg.model_channels)
        if cfg.augment_dim:
            emb = emb + augment_embedding(self, augment_labels, emb.shape[0])
        emb = self.map_layer1(nn.silu(self.map_layer0(emb)))
        if cfg.label_dim:
            emb = emb + self.map_label(drop_labels(self, class_labels, cfg.label_dropout, train))
        return nn.silu(emb)

    def input_state(self, x):
        """The state entering the encoder: (x, None)."""
        return x, None

    def compute_node(self, node, values, emb, scales, attention, train):
        """One node's value from its inputs' values: (h, None) for blocks, F for "out".

        Returns (value, attention residual or None)."""
        h = values[node.inputs[0]][0]
        if node.kind == "output":
            return self.out_conv(nn.silu(self.out_norm(h))), None
        layer = (self.enc if node.kind == "encoder" else self.dec)[node.module]
        if node.op == "conv":
            return (layer(h), None), None
        h, attention = layer(concat_skip(h, node, values, scales), emb, train, attention,
                             True)
        return (h, None), attention
