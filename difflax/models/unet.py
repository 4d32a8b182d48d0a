"""The EDM paper's UNets in Flax: DDPM++ / NCSN++ (`SongUNet`) and ADM (`DhariwalUNet`).

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models"
(NeurIPS 2022), code NVlabs/edm `training/networks.py`. Same blocks, same parameter
names (`enc_16x16_conv` here is `enc.16x16_conv` there), NHWC layout.

Two additions serve the rest of difflax:
- the forward pass runs over a static list of named feature nodes (`feature_nodes`: the
  encoder blocks, the middle blocks, the decoder blocks, the output) with an optional cache:
  `run(..., cache, reuse, store)` takes the nodes named in `reuse` from the cache, computes
  only the nodes the output (and `store`) still depend on, and returns the nodes named in
  `store`. Encoder propagation (Faster Diffusion), deep-branch reuse (DeepCache) and A-SDM's
  block / layer / unit feature inheritance are plans over this one mechanism
  (`difflax.accel.feature_reuse`);
- `skip_scales` multiplies each skip connection before the decoder concatenates it
  (Skip-Tuning, Ma et al. 2024). The skips are listed by `skip_connections(config)`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax.models.gri_attention import GRIConfig
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

    A-SDM model assembly (difflax.accel.assembly): `drop_blocks` names blocks (nodes of
    `feature_nodes`, e.g. "enc.16x16_block1") whose residual branch is removed, replaced by
    a `condconv_experts`-expert CondConv if that is > 0; `drop_attention` names blocks whose
    attention unit is removed; `attention="gri"` makes the remaining attention units GRI
    attention with `gri_window`, `gri_pool`, `gri_combine` (difflax.models.gri_attention).
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
    drop_blocks: Sequence[str] = ()
    drop_attention: Sequence[str] = ()
    condconv_experts: int = 0
    attention: str = "full"
    gri_window: int = 4
    gri_pool: int = 2
    gri_combine: str = "joint"

    def __post_init__(self):
        for name in ("channel_mult", "attn_resolutions", "resample_filter"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("drop_blocks", "drop_attention"):
            object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))
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
        _check_assembly(self)


def _check_assembly(cfg):
    """The A-SDM surgery fields name existing blocks and valid layouts."""
    nodes = feature_nodes(cfg)
    for name in cfg.drop_blocks:
        _check_choice("drop_blocks entry", name, prunable_blocks(cfg))
    for name in cfg.drop_attention:
        _check_choice("drop_attention entry", name, [n.name for n in nodes if n.attention])
    _check_choice("attention", cfg.attention, ("full", "gri"))
    if cfg.condconv_experts < 0:
        raise ValueError(f"condconv_experts must be >= 0 (0: no CondConv), not {cfg.condconv_experts}")
    if cfg.attention == "gri":
        for res in {n.resolution for n in nodes if n.attention and n.name not in cfg.drop_attention}:
            gri_config(cfg).check(res, res)


def prunable_blocks(cfg) -> tuple[str, ...]:
    """The residual blocks whose branch `drop_blocks` may remove, in execution order."""
    return tuple(n.name for n in feature_nodes(cfg)
                 if n.kind != "output" and not n.name.endswith("_conv"))


def gri_config(cfg) -> GRIConfig | None:
    """The GRI layout of the config's attention units, None for full attention."""
    if cfg.attention != "gri":
        return None
    return GRIConfig(window=cfg.gri_window, pool=cfg.gri_pool, combine=cfg.gri_combine)


def _surgery(cfg, name: str, attention: bool) -> dict:
    """`UNetBlock` options of block `name` ("enc.16x16_block0") under the A-SDM fields."""
    residual = "full"
    if name in cfg.drop_blocks:
        residual = "condconv" if cfg.condconv_experts else "none"
    attends = any(n.name == name and n.attention for n in feature_nodes(cfg))
    return dict(attention=attention and attends and name not in cfg.drop_attention, residual=residual,
                condconv_experts=cfg.condconv_experts or 1, gri=gri_config(cfg))


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


class FeatureNode(NamedTuple):
    """One cacheable node of the forward pass.

    name: "enc.<skip name>" (encoder block, one per skip connection, with the NCSN++ aux
    layers at its resolution), "dec.<R>x<R>_in0/in1" (middle), "dec.<R>x<R>_up/_block<i>"
    (decoder; the last block of a level carries that level's output (aux) layers), or "out"
    (the network output F, before preconditioning). kind: "encoder", "middle", "decoder" or
    "output". inputs: the nodes whose values it reads ("input" is the image). attention: the
    block has an attention unit, cacheable as f"{name}.attn".
    """

    name: str
    kind: str
    resolution: int
    inputs: tuple
    attention: bool


def _attends(config: UNetConfig, attention: bool, channels: int) -> bool:
    """EDM's UNetBlock attends with num_heads = 1 (SongUNet) or channels // 64 (ADM), and
    has no attention unit at all where that is 0 (an ADM level under 64 channels)."""
    return attention and (config.model_type == "SongUNet" or channels // 64 > 0)


def feature_nodes(config: UNetConfig) -> tuple[FeatureNode, ...]:
    """The forward pass's nodes in execution order (see `FeatureNode`)."""
    nodes, prev = [], "input"
    for skip in skip_connections(config):
        attn = _attends(config, "_block" in skip.name and skip.resolution in config.attn_resolutions,
                        skip.channels)
        nodes.append(FeatureNode("enc." + skip.name, "encoder", skip.resolution, (prev,), attn))
        prev = nodes[-1].name
    pending = [n.name for n in nodes]
    levels = len(config.channel_mult)
    for level in reversed(range(levels)):
        res = config.img_resolution >> level
        channels = config.model_channels * config.channel_mult[level]
        if level == levels - 1:
            nodes.append(FeatureNode(f"dec.{res}x{res}_in0", "middle", res, (prev,),
                                     _attends(config, True, channels)))
            nodes.append(FeatureNode(f"dec.{res}x{res}_in1", "middle", res, (nodes[-1].name,), False))
        else:
            nodes.append(FeatureNode(f"dec.{res}x{res}_up", "decoder", res, (prev,), False))
        prev = nodes[-1].name
        for idx in range(config.num_blocks + 1):
            attn = _attends(config, res in config.attn_resolutions and (
                idx == config.num_blocks or config.model_type == "DhariwalUNet"), channels)
            nodes.append(FeatureNode(f"dec.{res}x{res}_block{idx}", "decoder", res,
                                     (prev, pending.pop()), attn))
            prev = nodes[-1].name
    nodes.append(FeatureNode("out", "output", config.img_resolution, (prev,), False))
    return tuple(nodes)


def nodes_to_compute(nodes, reuse=frozenset(), store=frozenset(), output=True) -> frozenset:
    """The nodes a run must compute: those the output (if `output`) and the stored nodes
    depend on, stopping at nodes taken from the cache (`reuse`). Unit names
    ("<node>.attn") in `store` make their block computed."""
    inputs = {n.name: n.inputs for n in nodes}
    needed = set()
    stack = (["out"] if output else []) + [name.removesuffix(".attn") for name in store]
    while stack:
        name = stack.pop()
        if name in reuse or name in needed or name == "input":
            continue
        needed.add(name)
        stack.extend(inputs[name])
    return frozenset(needed)


def check_node_names(config: UNetConfig, names, what: str):
    """Raises a ValueError naming the unknown entries of `names` and where to list valid ones."""
    nodes = feature_nodes(config)
    valid = {n.name for n in nodes} | {n.name + ".attn" for n in nodes if n.attention}
    bad = sorted(set(names) - valid)
    if bad:
        raise ValueError(f"{what}: unknown feature nodes {bad}; valid names are the nodes of "
                         f"difflax.models.feature_nodes(config) (e.g. {nodes[0].name!r}, "
                         f"{nodes[-2].name!r}, 'out') and '<node>.attn' for attention units")


def _run(unet, x, emb, cache, reuse, store, output, skip_scales, train):
    """The forward pass over `feature_nodes` with a cache; see `SongUNet.run`."""
    cfg = unet.config
    reuse, store = frozenset(reuse), frozenset(store)
    check_node_names(cfg, reuse | store, "reuse/store")
    nodes = feature_nodes(cfg)
    compute = nodes_to_compute(nodes, reuse, store, output)
    skips = skip_connections(cfg)
    scales = dict(zip(("enc." + s.name for s in skips), _check_skip_scales(skip_scales, len(skips))))
    values, stored = {}, {}
    if any("input" in n.inputs for n in nodes if n.name in compute):
        if x is None:
            raise ValueError("this run computes encoder blocks, so it needs the input x")
        values["input"] = unet.input_state(x)
    for node in nodes:
        if node.name in reuse:
            values[node.name] = cache[node.name]
        elif node.name in compute:
            unit = node.name + ".attn"
            values[node.name], attention = unet.compute_node(
                node, values, emb, scales, cache[unit] if unit in reuse else None, train)
            if unit in store:
                stored[unit] = attention
    stored.update({name: values[name] for name in store if name in values})
    return (values["out"] if output else None), stored


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


class _CachedUNet(nn.Module):
    """What both UNet families share: `run`, the forward pass over `feature_nodes` with a
    cache, and `__call__`. Subclasses define `embed`, `input_state` and `compute_node`."""

    config: UNetConfig

    def run(self, x, emb, *, cache=None, reuse=(), store=(), output=True, skip_scales=None,
            train=False):
        """Forward pass with a feature cache.

        x: (B, R, R, C_in) or None when no computed node needs it; emb: (B, E) from `embed`;
        cache: {node name: value} holding every name in `reuse`; store: names whose values to
        return. Returns (F (B, R, R, C_out) or None if not `output`, {name: value} for `store`).
        With nothing reused it is exactly the plain forward pass.
        """
        return _run(self, x, emb, cache, reuse, store, output, skip_scales, train)

    def __call__(self, x, noise_labels, class_labels=None, *, skip_scales=None,
                 augment_labels=None, train=False):
        emb = self.embed(noise_labels, class_labels, augment_labels, train)
        return self.run(x, emb, skip_scales=skip_scales, train=train)[0]


class SongUNet(_CachedUNet):
    """EDM `SongUNet`. x: (B, R, R, in_channels), noise_labels: (B,), class_labels: (B, label_dim)."""

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
                enc[f"{res}x{res}_down"] = UNetBlock(
                    cout, down=True, **block, **_surgery(cfg, f"enc.{res}x{res}_down", False))
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
                enc[f"{res}x{res}_block{idx}"] = UNetBlock(cout, **block, **_surgery(
                    cfg, f"enc.{res}x{res}_block{idx}", res in cfg.attn_resolutions))
        self.enc = enc

        dec = {}
        levels = len(cfg.channel_mult)
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = cfg.img_resolution >> level
            if level == levels - 1:
                dec[f"{res}x{res}_in0"] = UNetBlock(cout, **block,
                                                    **_surgery(cfg, f"dec.{res}x{res}_in0", True))
                dec[f"{res}x{res}_in1"] = UNetBlock(cout, **block,
                                                    **_surgery(cfg, f"dec.{res}x{res}_in1", False))
            else:
                dec[f"{res}x{res}_up"] = UNetBlock(cout, up=True, **block,
                                                   **_surgery(cfg, f"dec.{res}x{res}_up", False))
            for idx in range(cfg.num_blocks + 1):
                cout = cfg.model_channels * mult
                attn = idx == cfg.num_blocks and res in cfg.attn_resolutions
                dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cout, **block, **_surgery(cfg, f"dec.{res}x{res}_block{idx}", attn))
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
        if cfg.augment_dim:
            emb = emb + _augment(self, augment_labels, emb.shape[0])
        return nn.silu(self.map_layer1(nn.silu(self.map_layer0(emb))))

    def input_state(self, x):
        """The state entering the encoder: (x, aux), aux the image for NCSN++'s aux encoders."""
        return x, (None if self.config.encoder_type == "standard" else x)

    def compute_node(self, node, values, emb, scales, attention, train):
        """One node's value from its inputs' values: (h, aux) for blocks, F for "out".

        Returns (value, attention residual or None)."""
        if node.kind == "output":
            return values[node.inputs[0]][1], None
        stem = node.name.split(".", 1)[1]
        res = stem.split("_")[0]
        h, aux = values[node.inputs[0]]
        if node.kind == "encoder":
            block = self.enc[stem]
            if not isinstance(block, UNetBlock):
                return (block(h), aux), None
            h, attention = block(h, emb, train, attention, with_attention=True)
            if f"{res}_aux_down" in self.enc and stem.endswith("_down"):
                aux = self.enc[f"{res}_aux_down"](aux)
                h = h + self.enc[f"{res}_aux_skip"](aux)
            if f"{res}_aux_residual" in self.enc and stem.endswith("_down"):
                h = aux = (h + self.enc[f"{res}_aux_residual"](aux)) / math.sqrt(2)
            return (h, aux), attention
        if node.inputs[0].startswith("enc."):
            aux = None  # the decoder's aux (output) path starts empty
        if "_block" in stem:
            h = jnp.concatenate([h, _scaled(values[node.inputs[1]][0], scales[node.inputs[1]])], -1)
        h, attention = self.dec[stem](h, emb, train, attention, with_attention=True)
        if stem.endswith(f"_block{self.config.num_blocks}") and f"{res}_aux_norm" in self.dec:
            if f"{res}_aux_up" in self.dec:
                aux = self.dec[f"{res}_aux_up"](aux)
            tmp = self.dec[f"{res}_aux_conv"](nn.silu(self.dec[f"{res}_aux_norm"](h)))
            aux = tmp if aux is None else tmp + aux
        return (h, aux), attention

def _augment(module, augment_labels, batch):
    """EDM's augmentation-label term, map_augment(labels), bias-free; without labels EDM
    skips it: here the zero labels give exactly 0 and keep `map_augment` in the parameters
    (Flax creates a layer's parameters only when it is called)."""
    if augment_labels is None:
        augment_labels = jnp.zeros((batch, module.config.augment_dim), jnp.float32)
    return module.map_augment(augment_labels)


def _drop_labels(module, class_labels, rate, train):
    """Classifier-free-guidance label dropout: zero each sample's label with probability `rate`."""
    if not (train and rate):
        return class_labels
    keep = jax.random.uniform(module.make_rng("dropout"), (class_labels.shape[0], 1)) >= rate
    return class_labels * keep.astype(class_labels.dtype)


# ----------------------------------------------------------------------------
# ADM.


class DhariwalUNet(_CachedUNet):
    """EDM `DhariwalUNet` (ADM). x: (B, R, R, in_channels), noise_labels: (B,)."""

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
                enc[f"{res}x{res}_down"] = UNetBlock(
                    enc_channels, down=True, **block, **_surgery(cfg, f"enc.{res}x{res}_down", False))
            for idx in range(cfg.num_blocks):
                enc[f"{res}x{res}_block{idx}"] = UNetBlock(cout, **block, **_surgery(
                    cfg, f"enc.{res}x{res}_block{idx}", res in cfg.attn_resolutions))
            enc_channels = cout
        self.enc = enc
        dec = {}
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = cfg.img_resolution >> level
            if level == len(cfg.channel_mult) - 1:
                dec[f"{res}x{res}_in0"] = UNetBlock(
                    enc_channels, **block, **_surgery(cfg, f"dec.{res}x{res}_in0", True))
                dec[f"{res}x{res}_in1"] = UNetBlock(
                    enc_channels, **block, **_surgery(cfg, f"dec.{res}x{res}_in1", False))
            else:
                dec[f"{res}x{res}_up"] = UNetBlock(
                    enc_channels, up=True, **block, **_surgery(cfg, f"dec.{res}x{res}_up", False))
            enc_channels = cfg.model_channels * mult
            for idx in range(cfg.num_blocks + 1):
                dec[f"{res}x{res}_block{idx}"] = UNetBlock(enc_channels, **block, **_surgery(
                    cfg, f"dec.{res}x{res}_block{idx}", res in cfg.attn_resolutions))
        self.dec = dec
        self.out_norm = GroupNorm()
        self.out_conv = Conv2d(cfg.out_channels, 3, init=init_zero)

    def embed(self, noise_labels, class_labels=None, augment_labels=None, train=False):
        """Noise (+ augment, label) embedding, (B,) -> (B, emb_channels)."""
        cfg = self.config
        emb = positional_embedding(noise_labels, cfg.model_channels)
        if cfg.augment_dim:
            emb = emb + _augment(self, augment_labels, emb.shape[0])
        emb = self.map_layer1(nn.silu(self.map_layer0(emb)))
        if cfg.label_dim:
            emb = emb + self.map_label(_drop_labels(self, class_labels, cfg.label_dropout, train))
        return nn.silu(emb)

    def input_state(self, x):
        """The state entering the encoder: (x, None)."""
        return x, None

    def compute_node(self, node, values, emb, scales, attention, train):
        """One node's value from its inputs' values: (h, None) for blocks, F for "out"."""
        h = values[node.inputs[0]][0]
        if node.kind == "output":
            return self.out_conv(nn.silu(self.out_norm(h))), None
        stem = node.name.split(".", 1)[1]
        blocks = self.enc if node.kind == "encoder" else self.dec
        if not isinstance(blocks[stem], UNetBlock):
            return (blocks[stem](h), None), None
        if "_block" in stem and node.kind == "decoder":
            h = jnp.concatenate([h, _scaled(values[node.inputs[1]][0], scales[node.inputs[1]])], -1)
        h, attention = blocks[stem](h, emb, train, attention, with_attention=True)
        return (h, None), attention

def make_unet(config: UNetConfig) -> nn.Module:
    """The UNet module for `config.model_type`."""
    return {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}[config.model_type](config)
