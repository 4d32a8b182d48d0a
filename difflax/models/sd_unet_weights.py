"""Loading a diffusers `UNet2DConditionModel` folder (e.g. the unet/ folder of a Stable
Diffusion 1.x or 2.x checkpoint) into `difflax.models.sd_unet.SDUNet`."""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import traverse_util

from difflax.models.convert import fitted_variables
from difflax.models.diffusers_weights import flax_layout, flax_path, read_pretrained_folder
from difflax.models.sd_unet import (ADDITION_EMBED_TYPES, DOWN_BLOCKS, MID_BLOCKS, UP_BLOCKS,
                                    SDUNet, SDUNetConfig)

# (surgery is difflax's, never in a diffusers config.json)
_FIELDS = tuple(f.name for f in dataclasses.fields(SDUNetConfig) if f.name != "surgery")
_PER_BLOCK = ("layers_per_block", "attention_head_dim", "transformer_layers_per_block")
# config.json keys that do not change the network in float32 inference
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "cross_attention_dim",
            "upcast_attention", "dropout", "addition_embed_type_num_heads"}
# keys whose only implemented value is diffusers' default (SD 1.x and 2.x use it)
_DEFAULTS = {
    "center_input_sample": False, "only_cross_attention": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "num_attention_heads": None, "reverse_transformer_layers_per_block": None,
}
# diffusers module names -> the flattened names of difflax's modules
_RENAMES = {"downsamplers.0.conv": "downsamplers_0_conv", "upsamplers.0.conv": "upsamplers_0_conv",
            "ff.net.0.proj": "ff_proj", "ff.net.2": "ff_out"}


def _check_value(key: str, value, valid) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(v != valid for v in values):
        raise ValueError(f"unsupported UNet2DConditionModel {key}={value!r}; implemented: "
                         f"{valid!r}")


def _check_block_types(key: str, types, supported) -> None:
    for t in types:
        if t not in supported:
            raise ValueError(f"unsupported UNet2DConditionModel {key} entry {t!r}; supported: "
                             f"{list(supported)}")


def sd_unet_config_from_diffusers(config: dict) -> SDUNetConfig:
    """A diffusers `UNet2DConditionModel` config.json (as a dict) -> SDUNetConfig. Per-block
    ints are expanded to tuples; anything not implemented (other block types, Kandinsky's
    embeddings, ...) raises an error naming the key, its value and the supported ones."""
    name = config.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise ValueError(f"config is for {name!r}, not 'UNet2DConditionModel' (the one class "
                         "load_sd_unet reads)")
    for key, valid in _DEFAULTS.items():
        if key in config:
            _check_value(key, config[key], valid)
    unknown = sorted(set(config) - set(_FIELDS) - _IGNORED - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown UNet2DConditionModel config key(s) {unknown}; known: "
                         f"{sorted(set(_FIELDS) | _IGNORED | set(_DEFAULTS))}")
    fields = {k: v for k, v in config.items() if k in _FIELDS}
    levels = len(fields.get("block_out_channels", SDUNetConfig.block_out_channels))
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in fields:
            fields[key] = tuple(fields[key])
    for key in _PER_BLOCK:
        if key in fields:
            value = fields[key]
            if isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in value):
                raise ValueError(f"unsupported UNet2DConditionModel {key}={value!r}: nested "
                                 "per-layer lists are not implemented; use an int per block")
            fields[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
    if isinstance(fields.get("sample_size"), (list, tuple)):
        fields["sample_size"] = fields["sample_size"][0]
    if fields.get("sample_size") is None:
        fields.pop("sample_size", None)
    cfg = SDUNetConfig(**fields)
    _check_block_types("down_block_types", cfg.down_block_types, DOWN_BLOCKS)
    _check_block_types("up_block_types", cfg.up_block_types, UP_BLOCKS)
    _check_block_types("mid_block_type", [cfg.mid_block_type], MID_BLOCKS)
    _check_block_types("addition_embed_type", [cfg.addition_embed_type], ADDITION_EMBED_TYPES)
    for key in ("down_block_types", "up_block_types") + _PER_BLOCK:
        if len(getattr(cfg, key)) != levels:
            raise ValueError(f"{key} has {len(getattr(cfg, key))} entries, block_out_channels "
                             f"{levels}")
    return cfg


def _unet_flax_path(name: str, ndim: int) -> tuple[str, ...]:
    for old, new in _RENAMES.items():
        name = name.replace(f".{old}.", f".{new}.")
    return flax_path(name, ndim)


def init_sd_unet(config: SDUNetConfig, key, cross_attention_dim: int = 8) -> dict:
    """Random variables of SDUNet(config), initialised on the smallest latent it accepts."""
    r = 2 ** (len(config.block_out_channels) - 1)
    args = (jnp.zeros((1, r, r, config.in_channels)), jnp.zeros((1,)),
            jnp.zeros((1, 1, cross_attention_dim)))
    added = {}
    if config.addition_embed_type == "text_time":  # one time id, the rest text embedding
        width = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim
        added = dict(text_embeds=jnp.zeros((1, width)), time_ids=jnp.zeros((1, 1)))
    return SDUNet(config).init(key, *args, **added)


def convert_sd_unet_state_dict(state_dict, config: SDUNetConfig) -> dict:
    """diffusers UNet2DConditionModel state dict -> `{"params": ...}`: conv OIHW -> HWIO,
    linear (out, in) -> (in, out) (the transformers' proj_in/proj_out 1x1 convs of SD 1.x
    become linear kernels), norm weight -> scale. Missing, unexpected or mis-shaped entries
    raise one error naming them."""
    flat = {}
    for name, value in state_dict.items():
        path = _unet_flax_path(name, value.ndim)
        if path[-2] in ("proj_in", "proj_out") and value.ndim == 4:
            value = value[:, :, 0, 0]
        flat[path] = flax_layout(value)
    # cross-attention key/value input widths come from the weights themselves
    cross = next((v.shape[0] for k, v in flat.items() if k[-2] == "to_k" and "attn2" in k), 8)
    shapes = jax.eval_shape(lambda: init_sd_unet(config, jax.random.key(0), cross))["params"]
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
    return fitted_variables(flat, expected, "this UNet2DConditionModel (check config.json: "
                            "block_out_channels, layers_per_block, attention_head_dim, ...)")


def load_sd_unet(path: str | os.PathLike) -> tuple[SDUNet, dict]:
    """Loads a diffusers `UNet2DConditionModel` folder (config.json + *.safetensors, e.g. the
    unet/ folder of a Stable Diffusion 1.x / 2.x checkpoint) from a local path: returns
    `(SDUNet module, variables)`; `unet.apply(variables, latents, timesteps,
    encoder_hidden_states)` is NHWC in and out. Read with safetensors' numpy API (no torch);
    float16 files become float32."""
    config, state = read_pretrained_folder(
        path, "diffusers UNet2DConditionModel folder, e.g. the unet/ folder of a Stable "
        "Diffusion checkpoint")
    config = sd_unet_config_from_diffusers(config)
    return SDUNet(config), convert_sd_unet_state_dict(state, config)
