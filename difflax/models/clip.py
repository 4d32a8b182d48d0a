"""CLIP's text transformer (Radford et al. 2021, Sec. 2.4), the text encoder of Stable
Diffusion, in Flax, with the parameter names of transformers' `CLIPTextModel`.

    token + position embeddings -> num_hidden_layers pre-LayerNorm blocks (causal multi-head
    self-attention, MLP fc1 -> act -> fc2, each residual) -> final LayerNorm

SD 1.x uses OpenAI's CLIP ViT-L/14 text tower (hidden_act quick_gelu, x sigmoid(1.702 x));
SD 2.x OpenCLIP ViT-H/14's, converted to a CLIPTextModel folder (hidden_act gelu, 23 of its
24 layers kept). Stable Diffusion conditions on the last hidden state (B, 77, hidden_size),
computed without a padding mask (as diffusers' pipelines do for these encoders).
"""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from difflax.models.convert import fitted_variables
from difflax.models.diffusers_weights import flax_layout, flax_path, read_pretrained_folder

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers `CLIPTextModel` config.json that define the network
    (defaults: SD 1.x's ViT-L/14 text tower)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


class EncoderLayer(nn.Module):
    """transformers `CLIPEncoderLayer`: x + attn(ln1(x)) (causal), then x + mlp(ln2(x))."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        ln = lambda name: nn.LayerNorm(cfg.layer_norm_eps, use_fast_variance=False, name=name)
        b, n, c = x.shape
        h = ln("layer_norm1")(x)
        split = lambda t: t.reshape(b, n, cfg.num_attention_heads, c // cfg.num_attention_heads)
        q, k, v = (split(nn.Dense(c, name=f"self_attn_{p}_proj")(h)) for p in "qkv")
        h = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, n, c)
        x = x + nn.Dense(c, name="self_attn_out_proj")(h)
        h = nn.Dense(cfg.intermediate_size, name="mlp_fc1")(ln("layer_norm2")(x))
        return x + nn.Dense(c, name="mlp_fc2")(ACTIVATIONS[cfg.hidden_act](h))


class CLIPTextTransformer(nn.Module):
    """input_ids (B, L), L <= max_position_embeddings -> last hidden state (B, L, hidden_size)."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[1]} tokens; this text encoder takes at most "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                             name="position_embedding")(jnp.arange(input_ids.shape[1]))
        x = tokens + positions[None]
        for i in range(cfg.num_hidden_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}")(x)
        return nn.LayerNorm(cfg.layer_norm_eps, use_fast_variance=False,
                            name="final_layer_norm")(x)


_FIELDS = tuple(f.name for f in dataclasses.fields(CLIPTextConfig))
# transformers' names -> difflax's (flattened) module names
_RENAMES = {"embeddings.": "", "encoder.": "", "self_attn.": "self_attn_", "mlp.": "mlp_"}


def clip_text_config_from_transformers(config: dict) -> CLIPTextConfig:
    """A transformers CLIPTextModel config.json (a dict; a full CLIPModel's text_config is
    read too) -> CLIPTextConfig; an unsupported hidden_act raises an error naming the
    supported ones."""
    config = config.get("text_config", config)
    fields = {k: v for k, v in config.items() if k in _FIELDS}
    act = fields.get("hidden_act", CLIPTextConfig.hidden_act)
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported CLIPTextModel hidden_act={act!r}; supported: "
                         f"{sorted(ACTIVATIONS)}")
    return CLIPTextConfig(**fields)


def _clip_flax_path(name: str, ndim: int) -> tuple[str, ...] | None:
    name = name.removeprefix("text_model.")
    if name.endswith("position_ids") or not name.startswith(("embeddings", "encoder",
                                                             "final_layer_norm")):
        return None  # a buffer, or a CLIPModel's vision tower / projections
    for old, new in _RENAMES.items():
        name = name.replace(old, new)
    path = flax_path(name, ndim)
    if path[0].endswith("_embedding"):
        path = (path[0], "embedding")
    return path


def convert_clip_text_state_dict(state_dict, config: CLIPTextConfig) -> dict:
    """transformers CLIPTextModel (or CLIPModel) state dict -> `{"params": ...}` of
    CLIPTextTransformer; missing, unexpected or mis-shaped entries raise one error."""
    flat = {}
    for name, value in state_dict.items():
        path = _clip_flax_path(name, value.ndim)
        if path is not None:
            flat[path] = value if path[-1] == "embedding" else flax_layout(value)
    model = CLIPTextTransformer(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 1), np.int32)))
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(shapes["params"]).items()}
    return fitted_variables(flat, expected, "this CLIPTextModel (check config.json: "
                            "hidden_size, num_hidden_layers, vocab_size, ...)")


def load_clip_text_encoder(path: str | os.PathLike) -> tuple[CLIPTextTransformer, dict]:
    """Loads a transformers `CLIPTextModel` folder (config.json + model.safetensors, e.g. the
    text_encoder/ folder of a Stable Diffusion checkpoint) from a local path: returns
    `(CLIPTextTransformer, variables)`; `text.apply(variables, input_ids (B, L))` is the last
    hidden state (B, L, hidden_size). Read with safetensors' numpy API (no torch)."""
    config, state = read_pretrained_folder(
        path, "transformers CLIPTextModel folder, e.g. the text_encoder/ folder of a Stable "
        "Diffusion checkpoint")
    config = clip_text_config_from_transformers(config)
    return CLIPTextTransformer(config), convert_clip_text_state_dict(state, config)
