"""Stable Diffusion's UNet (LDM, Rombach et al. 2022, Sec. 3.3 and App. E) in Flax, NHWC, with
the layout and parameter names of diffusers' `UNet2DConditionModel` (SD 1.x and SD 2.x; also
SDXL's UNet, whose "text_time" embedding adds pooled-text and size conditioning to temb).

The forward pass is declared as a feature graph (`sd_feature_nodes`, difflax.models.graph),
so that every feature-reuse plan of difflax.accel runs on it, and run node by
node with a feature cache (`SDUNet.run`, `run_graph`); `__call__` is `run` with nothing
cached. In execution order:

    embed_time  timesteps (B,) -> sinusoidal features -> MLP -> temb (B, 4 C0) (not a node)
    encoder     "conv_in", then per down block i "down_blocks_<i>.layer_<j>" (ResNet j and, in
                a CrossAttnDownBlock2D, transformer j) and "down_blocks_<i>.downsampler"; each
                of these outputs is a skip, in the order `sd_skip_connections` lists them
    middle      "mid_block": ResNet, transformer, ResNet at the lowest resolution
    decoder     per up block i (deepest first) "up_blocks_<i>.layer_<j>", concatenating the
                last unused skip (times its skip scale: Skip-Tuning, Ma et al. 2024 Sec. 3)
                to its input, and "up_blocks_<i>.upsampler" (nearest 2x, 3x3 conv)
    output      "out": GroupNorm, SiLU, conv_out -> the prediction (epsilon for SD 1.x, v
                for SD 2.x)

Attention ("transformer") layers follow diffusers' `Transformer2DModel`: GroupNorm, proj_in (a
1x1 conv in SD 1.x, a linear layer with `use_linear_projection`, SD 2.x; both are kept as
Dense kernels here), `BasicTransformerBlock`s (self-attention, cross-attention on the text
encoder's hidden states, GEGLU feed-forward, each after a LayerNorm, each residual), proj_out,
residual; that last residual is a node's cacheable attention unit ("<node>.attn"). The layers
are in difflax.models.sd_unet_blocks. `attention_head_dim` in diffusers' configs is the number
of heads (diffusers issue 2011), and it is read as such here.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from difflax.models.graph import FeatureGraph, FeatureNode, run_graph
from difflax.models.sd_unet_blocks import (DownBlock, MidBlock, TimestepEmbedding, UpBlock, conv,
                                           group_norm, timestep_features)
from difflax.models.unet import SkipConnection, Surgery, check_surgery, skip_connections

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
    surgery: structural edits by block name (`difflax.models.Surgery`, or a dict of its
    fields; names: `block_params` / `difflax.models.prunable_blocks` for drop_blocks, the
    feature nodes with attention for drop_attention), as A-SDM's `student` builds them
    (difflax.accel.asdm); the kept parameters keep their diffusers names.
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
    surgery: Surgery = Surgery()

    def __post_init__(self):
        if isinstance(self.surgery, dict):
            object.__setattr__(self, "surgery", Surgery(**self.surgery))
        check_surgery(self)

    def feature_graph(self) -> FeatureGraph:
        """The forward pass as a feature graph (`sd_feature_nodes`)."""
        return sd_feature_nodes(self)

    def block_params(self) -> dict[str, tuple[str, ...]]:
        """The ResNets `surgery` may prune, in execution order, with their parameters' path:
        each encoder / decoder layer's by its feature node ("down_blocks_1.layer_0":
        ("down_blocks_1", "resnets_0")), the mid block's two by "mid_block.resnets_<k>" (its
        feature node "mid_block" holds both)."""
        blocks = {}
        for n in sd_feature_nodes(self):
            if n.kind == "middle":
                blocks.update({f"mid_block.resnets_{k}": ("mid_block", f"resnets_{k}")
                               for k in range(2)})
            elif n.op == "block":
                blocks[n.name] = (n.group, f"resnets_{n.index}")
        return blocks


def sd_feature_nodes(config: SDUNetConfig) -> FeatureGraph:
    """The forward pass's nodes in execution order (difflax.models.graph.FeatureNode).

    Encoder: "conv_in" (op "conv"), "down_blocks_<i>.layer_<j>" (op "block", attention in a
    CrossAttnDownBlock2D), "down_blocks_<i>.downsampler" (op "down", all blocks but the last).
    Middle: "mid_block" (op "block", attention; absent when mid_block_type is None). Decoder:
    "up_blocks_<i>.layer_<j>" (op "block", j = 0..layers, reading skip connections last to
    first), "up_blocks_<i>.upsampler" (op "up", all blocks but the last). Output: "out".
    Groups are diffusers' blocks ("conv_in", "down_blocks_<i>", "mid_block", "up_blocks_<i>"),
    index the position in the group; `module` is the name with "." as "_" (the skip names of
    `sd_skip_connections`); resolutions are at `sample_size`, channels the output channels.
    """
    cfg, levels = config, len(config.block_out_channels)
    nodes = []

    def add(name, kind, op, res, channels, attention=False, index=0, skip=None):
        inputs = (nodes[-1].name if nodes else "input",) + ((skip,) if skip else ())
        group = name.split(".")[0]
        nodes.append(FeatureNode(name, kind, op, inputs, res, channels, attention, group, index,
                                 name.replace(".", "_")))

    add("conv_in", "encoder", "conv", cfg.sample_size, cfg.block_out_channels[0])
    for i, ch in enumerate(cfg.block_out_channels):
        res, n = cfg.sample_size >> i, cfg.layers_per_block[i]
        for j in range(n):
            add(f"down_blocks_{i}.layer_{j}", "encoder", "block", res, ch,
                cfg.down_block_types[i] == "CrossAttnDownBlock2D", j)
        if i < levels - 1:
            add(f"down_blocks_{i}.downsampler", "encoder", "down", res >> 1, ch, index=n)
    pending = [n.name for n in nodes]
    if cfg.mid_block_type:
        add("mid_block", "middle", "block", nodes[-1].resolution, nodes[-1].channels, True)
    for i, kind in enumerate(cfg.up_block_types):
        level = levels - 1 - i
        res, ch, n = cfg.sample_size >> level, cfg.block_out_channels[level], cfg.layers_per_block[level] + 1
        for j in range(n):
            add(f"up_blocks_{i}.layer_{j}", "decoder", "block", res, ch,
                kind == "CrossAttnUpBlock2D", j, pending.pop())
        if level > 0:
            add(f"up_blocks_{i}.upsampler", "decoder", "up", res << 1, ch, index=n)
    add("out", "output", "output", cfg.sample_size, cfg.out_channels)
    nodes[-1] = nodes[-1]._replace(group="", module="")
    return FeatureGraph(nodes)


def sd_skip_connections(config: SDUNetConfig) -> tuple[SkipConnection, ...]:
    """The UNet's skip connections in encoder order, as (name, resolution at sample_size,
    channels): index 0 is conv_in's output (the "top", named "conv_in"), then per down block
    i "down_blocks_<i>_layer_<j>" and "down_blocks_<i>_downsampler"; the last is the deepest
    down block's last layer (the "bottom"). Up block i consumes the skips of down block
    levels - 1 - i (and, for the last up block, conv_in's), last first; `skip_scales[k]`
    scales skip k. The skips of the feature graph (`difflax.models.skip_connections`)."""
    return skip_connections(config)


class SDUNet(nn.Module):
    """diffusers' `UNet2DConditionModel` (SD 1.x / 2.x, SDXL's UNet) in Flax, NHWC.

    `__call__(latents (B, h, w, in_channels), timesteps (B,) or scalar, encoder_hidden_states
    (B, M, cross_attention_dim), skip_scales=None, *, text_embeds=None, time_ids=None) ->
    (B, h, w, out_channels)`; h and w must be divisible by 2 ** (levels - 1). `skip_scales`:
    one scale per entry of `sd_skip_connections(config)` (a sequence or an array of that
    length), multiplying the skip where the decoder concatenates it (Skip-Tuning); None means
    all ones. `run` is the same forward pass with a feature cache. With bfloat16 latents and
    parameters everything but the time MLP (float32 sinusoidal features) computes in bfloat16.
    """

    config: SDUNetConfig

    def setup(self):
        cfg = self.config
        levels = len(cfg.block_out_channels)
        self.conv_in = conv(cfg.block_out_channels[0])
        self.time_embedding = TimestepEmbedding(4 * cfg.block_out_channels[0])
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(4 * cfg.block_out_channels[0])
        self.down_blocks = [DownBlock(i, cfg) for i in range(levels)]
        if cfg.mid_block_type:
            self.mid_block = MidBlock(cfg)
        self.up_blocks = [UpBlock(i, cfg) for i in range(levels)]
        self.conv_norm_out = group_norm(cfg)
        self.conv_out = conv(cfg.out_channels)

    def __call__(self, latents, timesteps, encoder_hidden_states, skip_scales=None, *,
                 text_embeds=None, time_ids=None):
        return self.run(latents, timesteps, encoder_hidden_states, skip_scales,
                        text_embeds=text_embeds, time_ids=time_ids)[0]

    def run(self, latents, timesteps, encoder_hidden_states, skip_scales=None, *,
            text_embeds=None, time_ids=None, cache=None, reuse=(), store=(), output=True):
        """The forward pass with a feature cache (difflax.models.graph.run_graph over
        `config.feature_graph()`): nodes (and "<node>.attn" transformer residuals) in `reuse`
        come from `cache`, those in `store` are returned. latents may be None when no
        computed node reads them (the batch is then encoder_hidden_states'). Returns
        (prediction (B, h, w, out_channels) or None if not `output`, {name: value}).
        """
        if latents is not None:
            factor = 2 ** (len(self.config.block_out_channels) - 1)
            if latents.shape[1] % factor or latents.shape[2] % factor:
                raise ValueError(f"latents of size {latents.shape[1:3]}: height and width must "
                                 f"be divisible by {factor} (2 ** (levels - 1))")
        batch = encoder_hidden_states.shape[0] if latents is None else latents.shape[0]
        # the time MLP sees float32 features; the rest computes in the latents' dtype (or the
        # text's, when no latents are given)
        dtype = encoder_hidden_states.dtype if latents is None else latents.dtype
        temb = self.embed_time(timesteps, batch, text_embeds, time_ids).astype(dtype)
        return run_graph(self, self.config.feature_graph(), latents,
                         (temb, encoder_hidden_states), cache=cache, reuse=reuse, store=store,
                         output=output, skip_scales=skip_scales)

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

    def input_state(self, latents):
        """The value of the graph's "input" node: the latents themselves."""
        return latents

    def compute_node(self, node, values, context, scales, attention, train):
        """One node's value (B, h, w, C) from its inputs' values; context is (temb,
        encoder_hidden_states). Returns (value, transformer residual or None)."""
        temb, text = context
        h = values[node.inputs[0]]
        if node.op == "conv":
            return self.conv_in(h), None
        if node.kind == "output":
            return self.conv_out(nn.silu(self.conv_norm_out(h))), None
        if node.kind == "middle":
            return self.mid_block(h, temb, text, attention)
        path, index = node.group.rsplit("_", 1)
        block = getattr(self, path)[int(index)]
        if node.op == "down":
            return block.downsample(h), None
        if node.op == "up":
            return block.upsample(h), None
        if node.kind == "encoder":
            return block.layer(node.index, h, temb, text, attention)
        skip, scale = values[node.inputs[1]], scales[node.inputs[1]]
        skip = skip if scale is None else skip * scale
        return block.layer(node.index, h, skip, temb, text, attention)


def sd_run_fn(unet: SDUNet, variables, encoder_hidden_states, *, guidance_scale=None,
              skip_scales=None, text_embeds=None, time_ids=None):
    """`SDUNet.run` as the model of a sampler and of feature-reuse plans
    (`difflax.samplers.sample_with_plan`), as `difflax.samplers.denoiser_run_fn` is for EDM.

    Time: the sampler runs on SD's discrete VP schedule (`difflax.schedules.vp_discrete`, as
    difflax.pipelines.StableDiffusion), whose time is the UNet's timestep, passed as is; the
    model's prediction is the UNet's output (epsilon for SD 1.x: prediction="eps"; v for SD
    2.x: prediction="v"). encoder_hidden_states (B, M, D); with `guidance_scale` w it is
    (2B, M, D), the unconditional half first (as the pipeline concatenates them), the UNet
    runs on both halves in one call and the prediction is uncond + w (cond - uncond)
    (classifier-free guidance). For batched decoding (t of k x B: k steps' times, B each) the
    conditioning is tiled k times, as the cached features are. The cache's "out" is the
    (guided) prediction, of the sampler's batch B.

    Returns run(x (B, h, w, C) or None, t (B,) or (k B,), *, cache, reuse, store, output) ->
    (prediction or None, {name: value}).
    """
    halves = 1 if guidance_scale is None else 2
    batch = encoder_hidden_states.shape[0] // halves

    def run(x, t, *, cache=None, reuse=(), store=(), output=True):
        reuse, store = frozenset(reuse), frozenset(store)
        if "out" in reuse:
            return (cache["out"] if output else None), {}
        k = t.shape[0] // batch
        tile = lambda a: None if a is None else jnp.tile(a, (k,) + (1,) * (jnp.ndim(a) - 1))
        times = jnp.tile(jnp.reshape(t, (k, 1, batch)), (1, halves, 1)).reshape(-1)
        latents = None if x is None else jnp.concatenate([x] * halves)
        out, stored = unet.apply(variables, latents, times, tile(encoder_hidden_states),
                                 skip_scales, text_embeds=tile(text_embeds),
                                 time_ids=tile(time_ids), cache=cache, reuse=reuse,
                                 store=store - {"out"}, output=output or "out" in store,
                                 method=SDUNet.run)
        if out is not None and halves == 2:
            out = out.astype(jnp.float32)  # guidance in float32 when the UNet runs in bfloat16
            uncond, cond = jnp.moveaxis(out.reshape((k, 2, batch) + out.shape[1:]), 1, 0)
            out = (uncond + guidance_scale * (cond - uncond)).reshape((k * batch,) + out.shape[1:])
        if "out" in store:
            stored["out"] = out
        return (out if output else None), stored

    return run
