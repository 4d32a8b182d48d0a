"""Stable Diffusion's autoencoder (the KL-regularised VAE of Rombach et al. 2022, Sec. 3 and
App. G) in Flax, NHWC, with the layout and parameter names of diffusers' `AutoencoderKL`.

    encoder: conv_in, down blocks (ResNet blocks, then a stride-2 conv padded (0, 1, 0, 1)),
             mid block (ResNet, single-head self-attention, ResNet), GroupNorm, SiLU, conv_out
             to 2 * latent_channels; quant_conv (1x1) -> (mean, logvar), logvar clipped to
             [-30, 20] (the diagonal Gaussian posterior, `DiagonalGaussianDistribution`)
    decoder: post_quant_conv (1x1), conv_in, mid block, up blocks (layers_per_block + 1 ResNet
             blocks, then nearest 2x up-sampling and a conv), GroupNorm, SiLU, conv_out

Latent scaling (LDM Sec. 4.3.2 and D.1): a diffusion model sees z = (latent - shift_factor)
* scaling_factor (SD: shift 0, scale 0.18215). `encode_latents` / `decode_latents` are the one
place where that happens (through `scale_latents` / `unscale_latents`, also used for stored
posterior moments); `encode` / `decode` work on unscaled latents.
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
from difflax.models.diffusers_weights import (flax_layout, flax_path, read_pretrained_folder,
                                              torch_layout, torch_name, write_pretrained_folder)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers `AutoencoderKL` config.json that define the network.

    block_out_channels: channels per resolution level, full resolution first; the image is
    down-sampled len(block_out_channels) - 1 times (SD: (128, 256, 512, 512), 8x).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True


_EPS = 1e-6  # diffusers' resnet_eps for every GroupNorm of the autoencoder


def _norm(name: str, config: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=config.norm_num_groups, epsilon=_EPS, use_fast_variance=False,
                        name=name)


def _conv(features: int, kernel: int, name: str, stride: int = 1, padding="SAME") -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=padding, name=name)


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D` without time embedding: x + conv(act(norm(conv(act(norm(x))))))."""

    features: int
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        h = _conv(self.features, 3, "conv1")(nn.silu(_norm("norm1", self.config)(x)))
        h = _conv(self.features, 3, "conv2")(nn.silu(_norm("norm2", self.config)(h)))
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, "conv_shortcut")(x)
        return x + h


class SelfAttention(nn.Module):
    """The mid block's single-head attention over the H*W positions, with a residual."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = _norm("group_norm", self.config)(x).reshape(b, hgt * wid, c)
        q, k, v = (nn.Dense(c, name=n)(h) for n in ("to_q", "to_k", "to_v"))
        weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / np.sqrt(c), axis=-1)
        h = nn.Dense(c, name="to_out_0")(jnp.einsum("bqk,bkc->bqc", weights, v))
        return x + h.reshape(x.shape)


class Downsample(nn.Module):
    """diffusers `Downsample2D`, padding 0: zero-pad right and bottom by 1, 3x3 conv, stride 2."""

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, "conv", 2, "VALID")(x)


class Upsample(nn.Module):
    """diffusers `Upsample2D`: nearest-neighbour 2x, 3x3 conv."""

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, "conv")(x)


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2D`: ResNet, attention (optional), ResNet."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(c, self.config, name="resnets_0")(x)
        if self.config.mid_block_add_attention:
            x = SelfAttention(self.config, name="attentions_0")(x)
        return ResnetBlock(c, self.config, name="resnets_1")(x)


class Encoder(nn.Module):
    """NHWC images -> (B, H / f, W / f, 2 * latent_channels), f = 2 ** (levels - 1)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = _conv(cfg.block_out_channels[0], 3, "conv_in")(x)
        for i, ch in enumerate(cfg.block_out_channels):
            for j in range(cfg.layers_per_block):
                x = ResnetBlock(ch, cfg, name=f"down_blocks_{i}_resnets_{j}")(x)
            if i < len(cfg.block_out_channels) - 1:
                x = Downsample(name=f"down_blocks_{i}_downsamplers_0")(x)
        x = MidBlock(cfg, name="mid_block")(x)
        x = nn.silu(_norm("conv_norm_out", cfg)(x))
        return _conv(2 * cfg.latent_channels, 3, "conv_out")(x)


class Decoder(nn.Module):
    """Unscaled latents (B, h, w, latent_channels) -> NHWC images (B, h f, w f, out_channels)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        channels = cfg.block_out_channels[::-1]
        x = _conv(channels[0], 3, "conv_in")(z)
        x = MidBlock(cfg, name="mid_block")(x)
        for i, ch in enumerate(channels):
            for j in range(cfg.layers_per_block + 1):
                x = ResnetBlock(ch, cfg, name=f"up_blocks_{i}_resnets_{j}")(x)
            if i < len(channels) - 1:
                x = Upsample(name=f"up_blocks_{i}_upsamplers_0")(x)
        x = nn.silu(_norm("conv_norm_out", cfg)(x))
        return _conv(cfg.out_channels, 3, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers' `AutoencoderKL` in Flax, NHWC. `__call__` (used by `init`) encodes the
    posterior mean and decodes it."""

    config: VAEConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1))
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1))

    def __call__(self, images):
        return self.decode(self.encode(images)[0])

    def encode(self, images):
        """images (B, H, W, in_channels) in [-1, 1] -> (mean, logvar) of the diagonal Gaussian
        posterior, each (B, H / f, W / f, latent_channels), unscaled; logvar in [-30, 20]."""
        h = self.encoder(images)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """Unscaled latents (B, h, w, latent_channels) -> images (B, h * f, w * f, out_channels),
        about [-1, 1] (not clipped)."""
        if self.config.use_post_quant_conv:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def encode_latents(self, images, *, key=None):
        """Images -> the latents a diffusion model sees (`scale_latents`): of a posterior sample
        (as SiT's and LDM's training do) if `key` is given, else of the posterior mean."""
        mean, logvar = self.encode(images)
        noise = None if key is None else jax.random.normal(key, mean.shape, mean.dtype)
        return scale_latents(self.config, mean, logvar, noise)

    def decode_latents(self, latents):
        """Diffusion-model latents -> images: decode(unscale_latents(latents))."""
        return self.decode(unscale_latents(self.config, latents))


def scale_latents(config: VAEConfig, mean, logvar=None, noise=None):
    """Posterior moments -> diffusion-model latents (z - shift_factor) * scaling_factor, with
    z = mean + exp(logvar / 2) * noise (a posterior sample) or z = mean if noise is None.
    Together with `unscale_latents` the one place where the scaling is applied (numpy or jax
    arrays)."""
    z = mean if noise is None else mean + jnp.exp(0.5 * logvar) * noise
    return (z - config.shift_factor) * config.scaling_factor


def unscale_latents(config: VAEConfig, latents):
    """Diffusion-model latents -> the VAE's latents: latents / scaling_factor + shift_factor."""
    return latents / config.scaling_factor + config.shift_factor


# ----------------------------------------------------------------------------
# Loading a diffusers AutoencoderKL folder.

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(VAEConfig))
# config.json keys that do not change the network (or are checked below)
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size", "force_upcast",
            "act_fn", "down_block_types", "up_block_types", "latents_mean", "latents_std"}
# attention names of older diffusers / converted LDM checkpoints (e.g. SD 1.x's vae folders)
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


def vae_config_from_diffusers(config: dict) -> VAEConfig:
    """A diffusers `AutoencoderKL` config.json (as a dict) -> VAEConfig; anything this module
    does not implement raises one error naming the key and the valid value."""
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ValueError(f"config is for {name!r}, not 'AutoencoderKL' (the one class load_vae "
                         "reads)")
    levels = len(config.get("block_out_channels", VAEConfig.block_out_channels))
    supported = {"act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * levels,
                 "up_block_types": ["UpDecoderBlock2D"] * levels, "latents_mean": None,
                 "latents_std": None}
    for key, valid in supported.items():
        if key in config and (list(config[key]) if isinstance(config[key], (list, tuple))
                              else config[key]) != valid:
            raise ValueError(f"unsupported AutoencoderKL {key}={config[key]!r}; valid: {valid!r}")
    unknown = sorted(set(config) - set(_CONFIG_FIELDS) - _IGNORED)
    if unknown:
        raise ValueError(f"unknown AutoencoderKL config key(s) {unknown}; valid: "
                         f"{list(_CONFIG_FIELDS)}")
    fields = {k: v for k, v in config.items() if k in _CONFIG_FIELDS}
    if "block_out_channels" in fields:
        fields["block_out_channels"] = tuple(fields["block_out_channels"])
    if fields.get("shift_factor") is None:
        fields.pop("shift_factor", None)
    return VAEConfig(**fields)


def _vae_flax_path(name: str, ndim: int) -> tuple[str, ...]:
    # encoder.down_blocks.0.resnets.1.norm1.weight
    #   -> (encoder, down_blocks_0_resnets_1, norm1, scale)
    *modules, leaf = flax_path(name, ndim)
    modules[-1] = _DEPRECATED_ATTENTION.get(modules[-1], modules[-1])
    if modules[0] in ("encoder", "decoder") and len(modules) > 2 and modules[1].startswith(
            ("down_blocks", "up_blocks")):
        modules = [modules[0], f"{modules[1]}_{modules[2]}", *modules[3:]]
    return (*modules, leaf)


def convert_vae_state_dict(state_dict, config: VAEConfig) -> dict:
    """diffusers AutoencoderKL state dict (PyTorch names and layouts) -> `{"params": ...}`.

    Conv weights OIHW -> HWIO, linear (out, in) -> (in, out), GroupNorm weight -> scale; the
    attention's older names (query, key, value, proj_attn, also as 1x1 convs) are accepted.
    Missing, unexpected or mis-shaped entries raise one error naming them.
    """
    flat = {}
    for name, value in state_dict.items():
        value = np.asarray(value, np.float32)
        path = _vae_flax_path(name, value.ndim)
        if "attentions_0" in path and value.ndim == 4:  # a 1x1 conv used as a linear layer
            value = value[:, :, 0, 0]
        flat[path] = flax_layout(value)
    shapes = jax.eval_shape(lambda: init_vae(config, jax.random.key(0)))["params"]
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
    return fitted_variables(flat, expected, "this AutoencoderKL (check config.json: "
                            + ", ".join(_CONFIG_FIELDS[:6]) + ")")


def init_vae(config: VAEConfig, key, resolution: int | None = None) -> dict:
    """Random variables of AutoencoderKL(config), initialised on a (1, r, r, in_channels) image."""
    r = resolution or 2 ** (len(config.block_out_channels) - 1)
    return jax.jit(AutoencoderKL(config).init)(key, jnp.zeros((1, r, r, config.in_channels)))


def load_vae(path: str | os.PathLike) -> tuple[AutoencoderKL, dict]:
    """Loads a diffusers `AutoencoderKL` folder (config.json + *.safetensors) from a local path,
    e.g. a `save_pretrained` folder or the `vae/` folder of a Stable Diffusion checkpoint:
    returns `(AutoencoderKL module, variables)`. The weights are read with safetensors' numpy
    API (no torch); float16 files are converted to float32."""
    config, state = read_pretrained_folder(
        path, "diffusers AutoencoderKL folder, e.g. the vae/ folder of a Stable Diffusion "
        "checkpoint")
    config = vae_config_from_diffusers(config)
    return AutoencoderKL(config), convert_vae_state_dict(state, config)


def save_vae(path: str | os.PathLike, config: VAEConfig, variables) -> None:
    """Writes AutoencoderKL(config)'s `variables` as a diffusers AutoencoderKL folder
    (config.json + diffusion_pytorch_model.safetensors) that `load_vae`, `difflax encode`
    and diffusers' `AutoencoderKL.from_pretrained` read: `convert_vae_state_dict`'s inverse."""
    flat = traverse_util.flatten_dict(variables["params"])
    state = {torch_name(k): torch_layout(np.asarray(v, np.float32)) for k, v in flat.items()}
    levels = len(config.block_out_channels)
    write_pretrained_folder(path, {"_class_name": "AutoencoderKL", **dataclasses.asdict(config),
                                   "down_block_types": ["DownEncoderBlock2D"] * levels,
                                   "up_block_types": ["UpDecoderBlock2D"] * levels}, state)
