"""The EDM paper's UNets: their config and their feature graph.

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models"
(NeurIPS 2022), code NVlabs/edm `training/networks.py`: DDPM++ / NCSN++ (`SongUNet`,
difflax.models.song_unet) and ADM (`DhariwalUNet`, difflax.models.dhariwal_unet). This
module holds what both share: `UNetConfig` and its presets, the forward pass declared as a
`FeatureGraph` (`feature_nodes`: the encoder blocks, the middle blocks, the decoder blocks,
the output; difflax.models.graph), the skip connections it lists, and `EDMUNet`, the base
module that runs the graph with a feature cache and `skip_scales` (Skip-Tuning, Ma et al.
2024: each skip connection multiplied before the decoder concatenates it).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax.models.graph import FeatureGraph, FeatureNode, declared, feature_graph, run_graph

MODEL_TYPES = ("SongUNet", "DhariwalUNet")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(repr, choices))}")


@dataclasses.dataclass(frozen=True)
class Surgery:
    """Structural edits of a UNet, by block name (A-SDM's model assembly builds them,
    difflax.accel.asdm).

    `drop_blocks` names blocks (`prunable_blocks`: EDM's "enc.16x16_block1", SD's
    "down_blocks_1.layer_0") whose residual branch is removed, or replaced by `branch` if
    given; `drop_attention` names feature nodes whose attention unit is removed; `attention`,
    if given, replaces the softmax (self-)attention of the remaining attention units. `branch`
    and `attention` are the hooks of `UNetBlock` and of SD's `ResnetBlock` / `Attention`
    (`UNetBlock`'s docstring gives their signatures): hashable callables, e.g. frozen
    dataclasses. `UNetConfig` and `SDUNetConfig` check the names (`check_surgery`).
    """

    drop_blocks: Sequence[str] = ()
    drop_attention: Sequence[str] = ()
    branch: Callable | None = None
    attention: Callable | None = None

    def __post_init__(self):
        for name in ("drop_blocks", "drop_attention"):
            object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of a UNet, under EDM's constructor names.

    `model_type` is "SongUNet" (DDPM++ and NCSN++) or "DhariwalUNet" (ADM). The fields
    `embedding_type`, `channel_mult_noise`, `encoder_type`, `decoder_type` and
    `resample_filter` concern SongUNet only. The defaults are SongUNet's in EDM; `adm()`
    gives ADM's. Sequences are stored as tuples so that the config is hashable.

    `surgery` edits the network's blocks (a `Surgery`, or a dict of its fields; the default
    leaves the network whole; A-SDM's model assembly, difflax.accel.asdm, builds them); its
    block names are checked against the graph. `remat=True` rematerialises each UNet block
    (`jax.checkpoint`, `difflax.models.unet_block.RematUNetBlock`): the same parameters and
    outputs, less memory for the backward pass, one more forward pass of each block.
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
    surgery: Surgery = Surgery()
    remat: bool = False

    def __post_init__(self):
        for name in ("channel_mult", "attn_resolutions", "resample_filter"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if isinstance(self.surgery, dict):
            object.__setattr__(self, "surgery", Surgery(**self.surgery))
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
        check_surgery(self)

    def feature_graph(self) -> FeatureGraph:
        """The forward pass as a feature graph (`feature_nodes`)."""
        return feature_nodes(self)

    def block_params(self) -> dict[str, tuple[str, ...]]:
        """The blocks `surgery` may prune (the feature nodes of op "down", "block", "up"),
        in execution order, with their parameters' path: {"enc.16x16_block0":
        ("enc_16x16_block0",), ...}."""
        return {n.name: edm_block_path(n.name) for n in feature_nodes(self)
                if n.op in ("down", "block", "up")}


def check_surgery(cfg):
    """Raises a ValueError naming the valid choices unless `cfg.surgery` (a `Surgery`) names
    existing blocks of `cfg` (a config declaring `feature_graph()` and `block_params()`)."""
    for name in cfg.surgery.drop_blocks:
        _check_choice("drop_blocks entry", name, tuple(cfg.block_params()))
    for name in cfg.surgery.drop_attention:
        _check_choice("drop_attention entry", name,
                      [n.name for n in cfg.feature_graph() if n.attention])


def edm_block_path(name: str) -> tuple[str, ...]:
    """The path of EDM UNet block `name`'s parameters in the network's: "enc.16x16_block0" ->
    ("enc_16x16_block0",)."""
    return (name.replace(".", "_", 1),)


def block_params(model) -> dict[str, tuple[str, ...]]:
    """The residual blocks whose branch `Surgery.drop_blocks` may remove, in execution order:
    {block name: the path of its parameters in the network's}. `model`: a config declaring
    `block_params()` (`UNetConfig`, `SDUNetConfig`), or what holds one as its `net` (a
    denoiser) or its `config` (a network module, e.g. `SDUNet`)."""
    blocks = declared(model, "block_params")
    if blocks is not None:
        return blocks
    raise TypeError(f"{type(model).__name__} declares no prunable blocks: pass a UNetConfig, an "
                    "SDUNetConfig, or a model holding one")


def prunable_blocks(model) -> tuple[str, ...]:
    """The names `Surgery.drop_blocks` accepts for `model` (see `block_params`), in execution
    order: EDM UNets' "enc.16x16_block0", ...; SD UNets' "down_blocks_1.layer_0", ...,
    "mid_block.resnets_0", "mid_block.resnets_1", "up_blocks_0.layer_2", ..."""
    return tuple(block_params(model))


def block_surgery(cfg, node) -> dict:
    """`UNetBlock` options of the block of feature node `node` under `cfg.surgery`."""
    surgery = cfg.surgery
    return dict(attention=node.attention and node.name not in surgery.drop_attention,
                pruned=node.name in surgery.drop_blocks, branch=surgery.branch,
                attend=surgery.attention)


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


def skip_connections(config) -> tuple[SkipConnection, ...]:
    """The skip connections of a network's feature graph (`config`: a `UNetConfig`, an
    `SDUNetConfig`, or anything `difflax.models.feature_graph` accepts), in encoder order.

    Index 0 is the first convolution's output at full resolution (the "top"), the last
    index the deepest encoder block (the "bottom"). The decoder consumes them in reverse
    order: its first block concatenates the last skip. `skip_scales[i]` scales skip i.
    """
    return tuple(SkipConnection(n.module, n.resolution, n.channels)
                 for n in feature_graph(config).skips)


def _attends(config: UNetConfig, attention: bool, channels: int) -> bool:
    """EDM's UNetBlock attends with num_heads = 1 (SongUNet) or channels // 64 (ADM), and
    has no attention unit at all where that is 0 (an ADM level under 64 channels)."""
    return attention and (config.model_type == "SongUNet" or channels // 64 > 0)


def feature_nodes(config: UNetConfig) -> FeatureGraph:
    """The forward pass's nodes in execution order (difflax.models.graph.FeatureNode).

    Encoder: "enc.<R>x<R>_conv" (the first convolution, op "conv"), "enc.<R>x<R>_down"
    (op "down", with NCSN++'s aux layers at R) and "enc.<R>x<R>_block<i>" (op "block"), one
    per skip connection. Middle: "dec.<R>x<R>_in0", "_in1" (op "block", index 0, 1). Decoder:
    "dec.<R>x<R>_up" (op "up") and "dec.<R>x<R>_block<i>" (op "block", index i, reading skip
    connections last to first; SongUNet's block num_blocks carries the level's output (aux)
    layers). Output: "out", the network output F before preconditioning. Groups are
    "enc.<R>x<R>" and "dec.<R>x<R>" (the middle blocks in the decoder's); channels are each
    node's output channels; "input" is the image.
    """
    mc, levels, song = config.model_channels, len(config.channel_mult), config.model_type == "SongUNet"
    nodes = []

    def add(path, kind, op, res, channels, module, index=0, attention=False, skip=None):
        inputs = (nodes[-1].name if nodes else "input",) + ((skip,) if skip else ())
        nodes.append(FeatureNode(f"{path}.{module}", kind, op, inputs, res, channels,
                                 _attends(config, attention, channels), f"{path}.{res}x{res}",
                                 index, module))

    cout = config.in_channels
    for level, mult in enumerate(config.channel_mult):
        res = config.img_resolution >> level
        if level == 0:
            cout = mc * (1 if song else mult)
            add("enc", "encoder", "conv", res, cout, f"{res}x{res}_conv")
        else:
            add("enc", "encoder", "down", res, cout, f"{res}x{res}_down")
        for idx in range(config.num_blocks):
            cout = mc * mult
            add("enc", "encoder", "block", res, cout, f"{res}x{res}_block{idx}", idx,
                res in config.attn_resolutions)
    pending = [n.name for n in nodes]
    for level in reversed(range(levels)):
        res = config.img_resolution >> level
        if level == levels - 1:
            add("dec", "middle", "block", res, cout, f"{res}x{res}_in0", 0, True)
            add("dec", "middle", "block", res, cout, f"{res}x{res}_in1", 1)
        else:
            add("dec", "decoder", "up", res, cout, f"{res}x{res}_up")
        cout = mc * config.channel_mult[level]
        for idx in range(config.num_blocks + 1):
            attention = res in config.attn_resolutions and (idx == config.num_blocks or not song)
            add("dec", "decoder", "block", res, cout, f"{res}x{res}_block{idx}", idx, attention,
                pending.pop())
    nodes.append(FeatureNode("out", "output", "output", (nodes[-1].name,), config.img_resolution,
                             config.out_channels))
    return FeatureGraph(nodes)


# ----------------------------------------------------------------------------
# What both UNet modules share.


class EDMUNet(nn.Module):
    """The forward pass over `feature_nodes` with a cache (`run`) and `__call__`, for both
    families. Subclasses define `embed`, `input_state` and `compute_node`
    (the protocol of difflax.models.graph.run_graph)."""

    config: UNetConfig

    def run(self, x, emb, *, cache=None, reuse=(), store=(), output=True, skip_scales=None,
            train=False):
        """Forward pass with a feature cache.

        x: (B, R, R, C_in) or None when no computed node needs it; emb: (B, E) from `embed`;
        cache: {node name: value} holding every name in `reuse`; store: names whose values to
        return; skip_scales: one entry per skip connection (`skip_connections`), or None.
        Returns (F (B, R, R, C_out) or None if not `output`, {name: value} for `store`).
        With nothing reused it is exactly the plain forward pass.
        """
        return run_graph(self, feature_nodes(self.config), x, emb, cache=cache, reuse=reuse,
                         store=store, output=output, skip_scales=skip_scales, train=train)

    def __call__(self, x, noise_labels, class_labels=None, *, skip_scales=None,
                 augment_labels=None, train=False):
        emb = self.embed(noise_labels, class_labels, augment_labels, train)
        return self.run(x, emb, skip_scales=skip_scales, train=train)[0]


def concat_skip(h, node: FeatureNode, values, scales):
    """h with the node's skip connection (its second input, times its scale) concatenated
    along channels, as EDM's decoder blocks read it; h itself for nodes without a skip."""
    if len(node.inputs) < 2:
        return h
    skip, scale = values[node.inputs[1]][0], scales[node.inputs[1]]
    skip = skip if scale is None else skip * jnp.asarray(scale, skip.dtype)
    return jnp.concatenate([h, skip], -1)


def augment_embedding(module, augment_labels, batch):
    """EDM's augmentation-label term, map_augment(labels), bias-free; without labels EDM
    skips it: here the zero labels give exactly 0 and keep `map_augment` in the parameters
    (Flax creates a layer's parameters only when it is called)."""
    if augment_labels is None:
        augment_labels = jnp.zeros((batch, module.config.augment_dim), jnp.float32)
    return module.map_augment(augment_labels)


def drop_labels(module, class_labels, rate, train):
    """Classifier-free-guidance label dropout: zero each sample's label with probability `rate`."""
    if not (train and rate):
        return class_labels
    keep = jax.random.uniform(module.make_rng("dropout"), (class_labels.shape[0], 1)) >= rate
    return class_labels * keep.astype(class_labels.dtype)
