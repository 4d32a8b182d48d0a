"""SiT: Scalable Interpolant Transformers (Ma et al. 2024), with GMem's snippet conditioning.

Ma, Goldstein, Albergo, Boffi, Vanden-Eijnden, Xie, "SiT: Exploring Flow and Diffusion-based
Generative Models with Scalable Interpolant Transformers" (ECCV 2024), code willisma/SiT
`models.py`: the DiT backbone (Peebles & Xie 2023) with adaLN-Zero blocks (DiT Sec. 3.2), a
sinusoidal time embedding of SiT's time t in [0, 1] (t = 1 is data, t = 0 noise), a label
table with one extra "null" row for classifier-free guidance. Parameter names follow the
PyTorch module names (`blocks_0/attn/qkv` here is `blocks.0.attn.qkv` there), so
`difflax.models.sit_weights.convert_sit_state_dict` maps a state dict by name. Images are NHWC.

GMem (Tang et al. 2024, "Generative Modeling with Explicit Memory", code LINs-lab/GMem
`models/feature_embedder.py`, `models/lightningdit.py`) conditions the same network on a
memory snippet: a vector of `snippet_dim` projected by a linear layer (with bias) and added to
the time embedding (with or instead of the label). In training the snippet goes through
element-wise dropout first (each feature zeroed with probability `snippet_dropout_prob`, 0.4
in GMem's code, the rest scaled by 1 / (1 - p): `nn.Dropout`); the null condition of
guidance is the zero snippet through the projection, i.e. its bias (GMem's `c_null =
zeros_like(c)`).

The forward pass is a feature graph (difflax.models.graph, `SiTConfig.feature_graph`): one
node per transformer block, so that the feature-reuse plans of difflax.accel
run on SiT (Faster Diffusion's encoder propagation on DiT: the first blocks as the encoder).

SiT's interpolants and samplers are in `difflax.interpolants`, its loss in
`difflax.training.interpolant_loss`, its PyTorch weights in `difflax.models.sit_weights`.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from difflax.models.graph import FeatureGraph, FeatureNode, run_graph
from difflax.models.precond import check_compute_dtype

# ----------------------------------------------------------------------------
# Configuration and the named presets (DiT's model sizes, DiT Table 1).

SIZES = {  # depth, hidden size, heads (DiT Table 1, as SiT uses them)
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)
PRESETS = tuple(f"SiT-{s}/{p}" for s in SIZES for p in PATCH_SIZES)


@dataclasses.dataclass(frozen=True)
class SiTConfig:
    """Hyper-parameters of a SiT, under the constructor names of willisma/SiT's `SiT`.

    `num_classes` = 0 drops the label embedding (GMem conditions on snippets only); with
    `class_dropout_prob` > 0 the label table has a null row `num_classes` (guidance).
    `snippet_dim` > 0 adds GMem's snippet projection. With `learn_sigma` the network
    predicts 2 * in_channels channels and returns the first in_channels, as SiT does.
    `repa_dim` > 0 adds a REPA projector (an MLP of width `repa_hidden`) on the tokens after
    block `repa_depth` (GMem trains with REPA: `training.interpolant_loss.repa_loss`).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    snippet_dim: int = 0
    snippet_dropout_prob: float = 0.4
    repa_depth: int = 0
    repa_dim: int = 0
    repa_hidden: int = 2048

    def __post_init__(self):
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.input_size % self.patch_size:
            valid = [p for p in range(1, self.input_size + 1) if self.input_size % p == 0]
            raise ValueError(f"patch_size {self.patch_size} does not divide input_size "
                             f"{self.input_size}; valid patch sizes: {valid}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 (the 2-D "
                             "sin-cos position embedding)")
        for name in ("class_dropout_prob", "snippet_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.num_classes < 0 or self.snippet_dim < 0:
            raise ValueError("num_classes and snippet_dim must be >= 0")
        if self.repa_dim and not 1 <= self.repa_depth <= self.depth:
            raise ValueError(f"repa_depth must be in [1, {self.depth}] when repa_dim > 0, "
                             f"got {self.repa_depth}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def feature_graph(self, encoder_depth: int = 0) -> FeatureGraph:
        """The forward pass as a feature graph: "blocks.<i>" for each transformer block i (value:
        the tokens (B, T, D)), then "out" (final layer and unpatchify); "input" is the
        patch-embedded image. The first `encoder_depth` blocks are "encoder" nodes, the others
        "decoder" nodes: Faster Diffusion's setting for DiT, so that encoder propagation on
        `config.feature_graph(encoder_depth=N)` reuses their output at non-key steps."""
        if not 0 <= encoder_depth <= self.depth:
            raise ValueError(f"encoder_depth must be in [0, {self.depth}], got {encoder_depth}")
        grid, nodes = self.input_size // self.patch_size, []
        for i in range(self.depth):
            nodes.append(FeatureNode(f"blocks.{i}", "encoder" if i < encoder_depth else "decoder",
                                     "block", (nodes[-1].name if nodes else "input",), grid,
                                     self.hidden_size, group="blocks", index=i, module=f"blocks_{i}"))
        nodes.append(FeatureNode("out", "output", "output", (nodes[-1].name,), self.input_size,
                                 self.in_channels))
        return FeatureGraph(nodes)


def sit_config(name: str, **overrides) -> SiTConfig:
    """A named preset "SiT-{S,B,L,XL}/{2,4,8}" (e.g. "SiT-XL/2"), fields overridden by name."""
    if name not in PRESETS:
        raise ValueError(f"unknown SiT preset {name!r}; valid choices: {', '.join(PRESETS)}")
    size, patch = name.removeprefix("SiT-").split("/")
    return SiTConfig(**{**SIZES[size], "patch_size": int(patch), **overrides})


# ----------------------------------------------------------------------------
# Embeddings.


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """(B,) times -> (B, dim) [cos(t f_k), sin(t f_k)], f_k = max_period^(-k / (dim/2)) (GLIDE)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """(grid_size^2, dim) fixed 2-D sin-cos position embedding of MAE / DiT, float32.

    The first dim/2 channels encode the column (MAE's meshgrid puts w first), the last
    dim/2 the row; each half is [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-k / (dim/4)).
    """
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32),
                             np.arange(grid_size, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], 1).astype(np.float32)


_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


def snippet_dropout(key, snippet, rate: float):
    """GMem's element-wise snippet dropout (torch `nn.Dropout`): each feature of snippet (B, D)
    is zeroed with probability `rate`, the others divided by 1 - rate."""
    keep = jax.random.bernoulli(key, 1.0 - rate, snippet.shape)
    return jnp.where(keep, snippet / (1.0 - rate), 0.0)


def _dense(features, name, zero=False, std=None, dtype=None):  # float32 params, computes in dtype
    init = _zeros if zero else (nn.initializers.normal(std) if std else _xavier)
    return nn.Dense(features, kernel_init=init, bias_init=_zeros, dtype=dtype,
                    param_dtype=jnp.float32, name=name)


def modulate(x, shift, scale):
    """adaLN: x (B, T, D) * (1 + scale (B, D)) + shift (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(x):  # statistics in float32, the result in x's dtype (flax's LayerNorm)
    return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False,
                        use_fast_variance=False)(x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm `Attention`, qkv_bias).
    The matmuls compute in `dtype`; the logits and the softmax are float32."""

    num_heads: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):  # (B, T, D) -> (B, T, D)
        b, t, d = x.shape
        qkv = _dense(3 * d, "qkv", dtype=self.dtype)(x).reshape(
            b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, H, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32
                            ) / math.sqrt(d // self.num_heads)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return _dense(d, "proj", dtype=self.dtype)(out.reshape(b, t, d))


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2 (timm `Mlp`), computing in `dtype`."""

    hidden: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(_dense(self.hidden, "fc1", dtype=self.dtype)(x), approximate=True)
        return _dense(x.shape[-1], "fc2", dtype=self.dtype)(h)


class SiTBlock(nn.Module):
    """DiT block with adaLN-Zero (DiT Sec. 3.2): gated, modulated attention and MLP.

    x (B, T, D), c (B, D) -> (B, T, D). The modulation layer starts at zero, so each block
    starts as the identity. Its linear layers compute in `dtype` (x is in it).
    """

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, c):
        d = x.shape[-1]
        mod = _dense(6 * d, "adaLN_modulation_1", zero=True, dtype=self.dtype)(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
        x = x + gate_msa[:, None] * Attention(self.num_heads, self.dtype, name="attn")(
            modulate(_layer_norm(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(
            modulate(_layer_norm(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated layer norm and a linear map to p * p * out_channels per token (zero init)."""

    patch_size: int
    out_channels: int

    @nn.compact
    def __call__(self, x, c):
        shift, scale = jnp.split(_dense(2 * x.shape[-1], "adaLN_modulation_1", zero=True)(
            nn.silu(c)), 2, -1)
        return _dense(self.patch_size**2 * self.out_channels, "linear", zero=True)(
            modulate(_layer_norm(x), shift, scale))


class SiT(nn.Module):
    """SiT(x, t, y, snippet) in SiT's time convention (t = 1 data, t = 0 noise).

    `apply(variables, x, t, y=None, snippet=None, *, drop=None, train=False)`:
      x: (B, H, W, C) NHWC with H = W = input_size; t: () or (B,) in [0, 1];
      y: (B,) int labels in [0, num_classes], num_classes being the null label (None: all
        null); snippet: (B, snippet_dim) memory snippets (None: the null snippet, zero);
      drop: (B,) bool, True replaces that sample's label and snippet by the null condition
        (the unconditional half of classifier-free guidance);
      train: labels are dropped at random per sample, snippets element-wise
        (`snippet_dropout`; rng stream "dropout").
    Returns (B, H, W, in_channels): the first in_channels of the output (the velocity,
    noise or score the model was trained for); with `return_repa`, also the REPA
    projection (B, T, repa_dim) of the tokens after block `repa_depth`. `pos_embed` is a
    parameter held fixed by a stop_gradient (frozen in SiT), so that converted weights are
    kept exactly. `run` is the same forward pass with a feature cache (`feature_graph`).

    `dtype` (as `Denoiser.dtype`): the patch embedding and the blocks compute in it on float32
    parameters; LayerNorm statistics, attention logits / softmax, the time / label / snippet
    embeddings and the final layer stay float32 (EDM's `use_fp16` scheme applied to the DiT);
    the output is float32 (mixed precision: `TrainConfig.compute_dtype`).
    """

    config: SiTConfig
    dtype: str = "float32"

    def _condition(self, b, y, snippet, drop, train):
        cfg = self.config
        c = jnp.zeros((b, cfg.hidden_size), jnp.float32)
        if train and (cfg.class_dropout_prob > 0 or cfg.snippet_dropout_prob > 0):
            key = self.make_rng("dropout")
        if cfg.num_classes:
            has_null = cfg.class_dropout_prob > 0
            table = nn.Embed(cfg.num_classes + has_null, cfg.hidden_size, name="y_embedder",
                             embedding_init=nn.initializers.normal(0.02))
            if not has_null and (y is None or drop is not None):
                raise ValueError("this SiT has no null label (class_dropout_prob = 0): pass "
                                 "labels y and no drop=")
            null = jnp.full((b,), cfg.num_classes, jnp.int32)
            y = null if y is None else jnp.broadcast_to(jnp.asarray(y, jnp.int32), (b,))
            if train and has_null:
                y = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 0),
                                                   cfg.class_dropout_prob, (b,)), null, y)
            if drop is not None:
                y = jnp.where(drop, null, y)
            c = c + table(y)
        if cfg.snippet_dim:
            snippet = (jnp.zeros((b, cfg.snippet_dim), jnp.float32) if snippet is None
                       else jnp.asarray(snippet, jnp.float32))
            if drop is not None:  # the null condition: the zero snippet
                snippet = jnp.where(drop[:, None], 0.0, snippet)
            if train and cfg.snippet_dropout_prob > 0:
                snippet = snippet_dropout(jax.random.fold_in(key, 1), snippet,
                                          cfg.snippet_dropout_prob)
            c = c + _dense(cfg.hidden_size, "snippet_embedder")(snippet)
        elif snippet is not None:
            raise ValueError("snippet given but this SiT has snippet_dim = 0")
        return c

    def __call__(self, x, t, y=None, snippet=None, *, drop=None, train=False, return_repa=False):
        out, stored = self.run(x, t, y, snippet, drop=drop, train=train, repa=return_repa)
        if return_repa:
            if "repa" not in stored:
                raise ValueError("return_repa needs a SiT with repa_dim > 0")
            return out, stored["repa"]
        return out

    @nn.compact
    def run(self, x, t, y=None, snippet=None, *, drop=None, train=False, cache=None, reuse=(),
            store=(), output=True, repa=False):
        """The forward pass with a feature cache (difflax.models.graph.run_graph over
        `config.feature_graph()`): nodes in `reuse` come from `cache`, nodes in `store` are
        returned. x may be None when nothing computed reads it (t then gives the batch).
        Returns (output (B, H, W, in_channels) or None if not `output`, {name: value}), with
        the REPA projection under "repa" when `repa` (and repa_dim > 0).
        """
        cfg = self.config
        check_compute_dtype(self.dtype)
        if x is not None and x.shape[1:] != (cfg.input_size, cfg.input_size, cfg.in_channels):
            raise ValueError(f"SiT takes inputs of shape (B, {cfg.input_size}, {cfg.input_size}, "
                             f"{cfg.in_channels}), got {x.shape}")
        b = jnp.size(t) if x is None else x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        temb = _dense(cfg.hidden_size, "t_embedder_mlp_0", std=0.02)(timestep_embedding(t, 256))
        temb = _dense(cfg.hidden_size, "t_embedder_mlp_2", std=0.02)(nn.silu(temb))
        c = temb + self._condition(b, y, snippet, drop, train)
        with_repa = cfg.repa_dim and (repa or self.is_initializing())
        aligned = f"blocks.{cfg.repa_depth - 1}"
        out, stored = run_graph(self, cfg.feature_graph(), x, c, cache=cache, reuse=reuse,
                                store=frozenset(store) | ({aligned} if with_repa else set()),
                                output=output, train=train)
        if with_repa:
            tokens = stored[aligned] if aligned in store else stored.pop(aligned)
            h = nn.silu(_dense(cfg.repa_hidden, "repa_projector_0", dtype=self.dtype)(tokens))
            h = nn.silu(_dense(cfg.repa_hidden, "repa_projector_1", dtype=self.dtype)(h))
            stored["repa"] = _dense(cfg.repa_dim, "repa_projector_2", dtype=self.dtype)(
                h).astype(jnp.float32)
        return out, stored

    def input_state(self, x):
        """Patch embedding (a p x p convolution of stride p, initialised as a linear layer)
        plus the fixed position embedding: (B, H, W, C) -> tokens (B, T, D) in `dtype`."""
        cfg = self.config
        p, g = cfg.patch_size, cfg.input_size // cfg.patch_size
        conv = nn.Conv(cfg.hidden_size, (p, p), (p, p), padding="VALID", name="x_embedder_proj",
                       kernel_init=nn.initializers.variance_scaling(
                           1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3),
                       dtype=self.dtype, param_dtype=jnp.float32)
        tokens = conv(x).reshape(x.shape[0], g * g, cfg.hidden_size)
        pos = self.param("pos_embed", lambda k, s: jnp.asarray(
            sincos_pos_embed_2d(cfg.hidden_size, g))[None], (1, g * g, cfg.hidden_size))
        return (tokens + jax.lax.stop_gradient(pos)).astype(self.dtype)

    def compute_node(self, node, values, c, scales, attention, train):
        """A block's tokens (B, T, D), or for "out" the final layer unpatchified to
        (B, H, W, in_channels) in float32. Returns (value, None): SiT has no cacheable
        attention unit."""
        cfg = self.config
        tokens = values[node.inputs[0]]
        if node.kind != "output":
            block = SiTBlock(cfg.num_heads, cfg.mlp_ratio, self.dtype, name=node.module)
            return block(tokens, c), None
        b, p, g = tokens.shape[0], cfg.patch_size, cfg.input_size // cfg.patch_size
        out = FinalLayer(p, cfg.out_channels, name="final_layer")(tokens.astype(jnp.float32), c)
        # unpatchify: (B, g*g, p*p*C') -> (B, g*p, g*p, C')
        out = out.reshape(b, g, g, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, g * p, g * p, cfg.out_channels)[..., :cfg.in_channels], None


def init_sit(config: SiTConfig, key: jax.Array) -> dict:
    """Fresh `{"params": ...}` of a SiT, SiT's initialisation (`initialize_weights`)."""
    x = jnp.zeros((1, config.input_size, config.input_size, config.in_channels))
    snippet = jnp.zeros((1, config.snippet_dim)) if config.snippet_dim else None
    y = jnp.zeros((1,), jnp.int32) if config.num_classes else None
    return SiT(config).init(key, x, jnp.ones((1,)), y, snippet)
