"""Layers of the EDM UNets (Karras et al. 2022, code NVlabs/edm `training/networks.py`), NHWC.

Parameter names follow EDM's (`weight`, `bias`) so that a PyTorch state_dict maps onto
them by name; only the layout differs: conv weights are HWIO here (OIHW in PyTorch),
linear weights are (in, out) (PyTorch: (out, in)).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------
# Initialisation: EDM's `weight_init`, with fans computed as EDM does.


def edm_init(mode: str, fan_in: int, fan_out: int, scale: float = 1.0):
    """Initializer matching EDM's `weight_init(shape, mode, fan_in, fan_out) * scale`."""

    def init(key, shape, dtype=jnp.float32):
        if scale == 0:
            return jnp.zeros(shape, dtype)
        if mode == "xavier_uniform":
            w = math.sqrt(6 / (fan_in + fan_out)) * jax.random.uniform(key, shape, dtype, -1, 1)
        elif mode == "xavier_normal":
            w = math.sqrt(2 / (fan_in + fan_out)) * jax.random.normal(key, shape, dtype)
        elif mode == "kaiming_uniform":
            w = math.sqrt(3 / fan_in) * jax.random.uniform(key, shape, dtype, -1, 1)
        elif mode == "kaiming_normal":
            w = math.sqrt(1 / fan_in) * jax.random.normal(key, shape, dtype)
        else:
            raise ValueError(f"unknown init mode {mode!r}; valid: xavier_uniform, xavier_normal, "
                             "kaiming_uniform, kaiming_normal")
        return w * scale

    return init


@dataclasses.dataclass(frozen=True)
class Init:
    """How a layer is initialised: EDM's `init_mode`, `init_weight`, `init_bias`."""

    mode: str = "kaiming_normal"
    weight: float = 1.0
    bias: float = 0.0


# ----------------------------------------------------------------------------
# Fully connected, convolution with resampling, group norm.


class Linear(nn.Module):
    """y = x W + b, W of shape (in, out). EDM `Linear`."""

    features: int
    use_bias: bool = True
    init: Init = Init()

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        w = self.param("weight", edm_init(self.init.mode, fan_in, self.features, self.init.weight),
                       (fan_in, self.features))
        x = x @ w.astype(x.dtype)  # computes in x's dtype, as EDM's layers (use_fp16)
        if self.use_bias:
            x = x + self.param("bias", edm_init(self.init.mode, fan_in, self.features, self.init.bias),
                               (self.features,)).astype(x.dtype)
        return x


_NHWC = ("NHWC", "HWIO", "NHWC")


def _resample_kernel(resample_filter: Sequence[int]) -> np.ndarray:
    f = np.asarray(resample_filter, np.float32)
    return np.outer(f, f) / f.sum() ** 2


def _depthwise(x, kernel, *, stride=1, padding=0, lhs_dilation=1):
    """Applies the same 2-D kernel to every channel of NHWC x."""
    c = x.shape[-1]
    k = jnp.tile(jnp.asarray(kernel, x.dtype)[:, :, None, None], (1, 1, 1, c))
    return jax.lax.conv_general_dilated(
        x, k, (stride, stride), [(padding, padding)] * 2, lhs_dilation=(lhs_dilation,) * 2,
        dimension_numbers=_NHWC, feature_group_count=c)


def downsample(x, resample_filter: Sequence[int]):
    """EDM's down-sampling: the filter outer(f, f) / sum(f)^2, stride 2, pad (len(f)-1)//2."""
    if tuple(resample_filter) == (1, 1):  # the 2x2 box filter: a reshape is much faster on CPU
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))
    f = _resample_kernel(resample_filter)
    return _depthwise(x, f, stride=2, padding=(f.shape[0] - 1) // 2)


def upsample(x, resample_filter: Sequence[int]):
    """EDM's up-sampling: transposed conv with 4 outer(f, f) / sum(f)^2, stride 2, pad (len(f)-1)//2.

    A transposed convolution is the convolution of the 2x-dilated input with the flipped
    kernel (symmetric here), padded by k - 1 - p on each side.
    """
    if tuple(resample_filter) == (1, 1):  # a 2x2 kernel of ones, stride 2: nearest neighbour
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    f = 4 * _resample_kernel(resample_filter)
    k = f.shape[0]
    return _depthwise(x, f, padding=k - 1 - (k - 1) // 2, lhs_dilation=2)


def _lax_conv(x, w, padding):
    return jax.lax.conv_general_dilated(x, w, (1, 1), [(padding, padding)] * 2,
                                        dimension_numbers=_NHWC)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def conv2d(x, w, padding: int):
    """Stride-1 convolution of NHWC x with HWIO w, zero-padded by `padding` on every side.

    The value is XLA's convolution, and so is its derivative, except on XLA:CPU for the wide
    convolutions where its weight gradient is slow (`matmul_weight_derivative`): there the
    derivative w.r.t. w is written as the sum over kernel offsets (i, j) of x's shifted window
    (a contiguous copy, rows = pixels) times w[i, j], which reverse mode transposes into one
    matrix product window^T @ g per offset: 0.58x XLA's time for 256 channels at 32x32
    (experiments/conv_weight_grad.py). Forward mode and higher derivatives work (a custom JVP).
    """
    return _lax_conv(x, w, padding)


def matmul_weight_derivative(x_shape, w_shape) -> bool:
    """Whether `conv2d` on CPU writes its weight derivative as matrix products: a kernel
    larger than 1x1, at least 96 input channels and images at least 24 pixels wide, where
    experiments/conv_weight_grad.py measured them faster than XLA's weight gradient (which
    wins on narrower or smaller convolutions, e.g. 1.29x faster at 32 channels, 16x16)."""
    return w_shape[0] * w_shape[1] > 1 and w_shape[2] >= 96 and x_shape[2] >= 24


def weight_linear(x, w_dot, padding):
    """The stride-1 convolution of x with w_dot, as one matrix product per kernel offset
    (`conv2d`'s derivative w.r.t. its weight on wide convolutions on CPU)."""
    kh, kw, cin, _ = w_dot.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = 0
    for i in range(kh):
        for j in range(kw):  # the barrier keeps the window a contiguous operand of the product
            window = jax.lax.optimization_barrier(xp[:, i:i + ho, j:j + wo].reshape(-1, cin))
            out = out + window @ w_dot[i, j]
    return out.reshape(x.shape[0], ho, wo, -1)


def _conv2d_jvp(padding, primals, tangents):
    (x, w), (x_dot, w_dot) = primals, tangents
    terms = []
    if not isinstance(x_dot, SymbolicZero):
        terms.append(_lax_conv(x_dot, w, padding))
    if not isinstance(w_dot, SymbolicZero):
        terms.append(jax.lax.platform_dependent(
            x, w_dot, cpu=lambda x, w_dot: weight_linear(x, w_dot, padding),
            default=lambda x, w_dot: _lax_conv(x, w_dot, padding))
            if matmul_weight_derivative(x.shape, w.shape) else _lax_conv(x, w_dot, padding))
    y = _lax_conv(x, w, padding)
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


conv2d.defjvp(_conv2d_jvp, symbolic_zeros=True)


class Conv2d(nn.Module):
    """EDM `Conv2d`: optional up/down-sampling, then a `kernel` x `kernel` convolution.

    `kernel=0` means no weights: a pure resampling layer. `fused_resample` (down only, as
    EDM uses it in NCSN++'s residual encoder) convolves first, padded by w_pad + f_pad, then
    filters with stride 2. Computes in x's dtype (float32 parameters cast to it, as EDM's
    layers do under use_fp16).
    """

    features: int
    kernel: int
    use_bias: bool = True
    up: bool = False
    down: bool = False
    resample_filter: Sequence[int] = (1, 1)
    fused_resample: bool = False
    init: Init = Init()

    @nn.compact
    def __call__(self, x):
        cin, k = x.shape[-1], self.kernel
        if k:
            fan_in, fan_out = cin * k * k, self.features * k * k
            w = self.param("weight", edm_init(self.init.mode, fan_in, fan_out, self.init.weight),
                           (k, k, cin, self.features)).astype(x.dtype)
        if self.fused_resample and self.down and k:
            f = _resample_kernel(self.resample_filter)
            x = conv2d(x, w, k // 2 + (f.shape[0] - 1) // 2)
            x = _depthwise(x, f, stride=2)
        else:
            if self.up:
                x = upsample(x, self.resample_filter)
            if self.down:
                x = downsample(x, self.resample_filter)
            if k:
                x = conv2d(x, w, k // 2)
        if k and self.use_bias:
            x = x + self.param("bias", edm_init(self.init.mode, fan_in, fan_out, self.init.bias),
                               (self.features,)).astype(x.dtype)
        return x

def _normalise_groups(x, groups: int, eps: float):
    """x (B, ..., C) -> (x_hat, rstd): x grouped to (B, ..., G, C // G), standardised over
    each example's group, and 1 / sqrt(var + eps) of shape (B, 1, ..., G, 1)."""
    y = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    axes = tuple(range(1, y.ndim - 2)) + (y.ndim - 1,)  # the pixels and the group's channels
    mean = y.mean(axes, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(y - mean).mean(axes, keepdims=True) + eps)
    return (y - mean) * rstd, rstd


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def group_norm(x, weight, bias, groups: int, eps: float):
    """Group normalisation of x (B, ..., C) over `groups` groups of channels, then
    x_hat * weight + bias (weight, bias: (C,)); the statistics are biased, as PyTorch's.

    The value is the plain formula; its derivative is written out (a custom JVP, linear in
    the tangents, so that reverse mode is its transpose):
        dy = weight rstd dx + S + x_hat T,  per example b and channel c:
        S = dbias - weight rstd mean_g(dx),  T = dweight - weight rstd mean_g(x_hat dx),
    mean_g over the channel's group and the pixels. Every per-(b, c) term is broadcast over
    the pixels in one place, so the transpose reduces the cotangent over the pixels only
    twice (its sum and its sum times x_hat) and derives every gradient from those. XLA's
    derivative of the plain formula reduces over the activations more often: on CPU it took
    1.9x the time (65 vs 35 ms, the CIFAR network's GroupNorm; the digits training step 543
    vs 436 ms; `experiments/speed.py --nets digits ops --split`).
    """
    x_hat, _ = _normalise_groups(x, groups, eps)
    return x_hat.reshape(x.shape) * weight + bias


def _group_norm_jvp(groups, eps, primals, tangents):
    (x, weight, bias), (x_dot, weight_dot, bias_dot) = primals, tangents
    x_hat, rstd = _normalise_groups(x, groups, eps)
    x_hat = x_hat.reshape(x.shape)
    b, c = x.shape[0], x.shape[-1]
    rstd = jnp.repeat(rstd.reshape(b, groups), c // groups, axis=1)  # (B, C)
    pixels = tuple(range(1, x.ndim - 1))
    count = x.size // (b * groups)

    def group_mean(sums):  # (B, C) sums over the pixels -> (B, C) means over each group
        means = sums.reshape(b, groups, c // groups).sum(-1) / count
        return jnp.repeat(means, c // groups, axis=1)

    s = bias_dot - weight * rstd * group_mean(x_dot.sum(pixels))
    t = weight_dot - weight * rstd * group_mean((x_hat * x_dot).sum(pixels))
    per_pixel = lambda a: a.reshape(b, *(1,) * len(pixels), c)  # noqa: E731
    return (x_hat * weight + bias,
            per_pixel(weight * rstd) * x_dot + per_pixel(s) + x_hat * per_pixel(t))


group_norm.defjvp(_group_norm_jvp)


class GroupNorm(nn.Module):
    """EDM `GroupNorm`: min(num_groups, C // min_channels_per_group) groups, computed in
    float32 (`group_norm`)."""

    num_groups: int = 32
    min_channels_per_group: int = 4
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        g = min(self.num_groups, c // self.min_channels_per_group)
        if g == 0 or c % g:
            raise ValueError(f"GroupNorm over {c} channels: EDM's min({self.num_groups}, C // "
                             f"{self.min_channels_per_group}) = {g} groups must divide C (EDM's "
                             "code fails here too); choose channel counts that allow it")
        weight = self.param("weight", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return group_norm(x.astype(jnp.float32), weight, bias, g, self.eps).astype(x.dtype)


# ----------------------------------------------------------------------------
# Noise-level embeddings.


def positional_embedding(x, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
    """EDM `PositionalEmbedding`: [cos(x f), sin(x f)], f_i = (1/max_positions)^(i / (C/2 - endpoint)).

    x: (B,) -> (B, num_channels).
    """
    half = num_channels // 2
    freqs = jnp.arange(half, dtype=jnp.float32) / (half - (1 if endpoint else 0))
    freqs = (1 / max_positions) ** freqs
    x = x[:, None].astype(jnp.float32) * freqs
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
    """EDM `FourierEmbedding` (NCSN++): [cos(2 pi x f), sin(2 pi x f)], f ~ N(0, scale^2) fixed.

    The frequencies are a parameter named `freqs` (EDM's buffer) held constant by
    `stop_gradient`. x: (B,) -> (B, num_channels).
    """

    num_channels: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, x):
        freqs = self.param("freqs", nn.initializers.normal(self.scale), (self.num_channels // 2,))
        x = x[:, None].astype(jnp.float32) * (2 * np.pi * jax.lax.stop_gradient(freqs))
        return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)
