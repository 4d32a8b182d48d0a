"""ME-CondConv and CLME-CondConv: a convolution whose kernel is a per-sample mixture of experts.

Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient Inference"
(NeurIPS 2019), eq. (1)-(2), as used by A-SDM (Zhu et al. 2024, "Accelerating Stable
Diffusion through Model Assembly and Feature Inheritance Strategies", ME-CondConv; and
"A-SDM: ... Redundancy Removal and Performance Optimization", CLME-CondConv):

    y = act((sum_i a_i(x, emb) W_i) * x + sum_i a_i b_i),
    a(x, emb) = sigmoid(GlobalAvgPool(x) R + emb R_emb + r),

with K experts W_i of shape (k, k, C_in, C_out). Mixing the K kernels costs K k^2 C_in C_out
per sample, independent of the image size, so the layer has K times the parameters of a
convolution at about the compute of one. Neither paper has public code; the choices here:

- the routing also sees the time (noise + label) embedding `emb` when given (A-SDM: "the
  mixing weights computed from the input and the time embedding");
- R starts at zero and the routing bias r at logit(1 / K), so that at initialisation every
  a_i = 1 / K and the mixed kernel is the mean of the experts: inherited experts (CLME)
  start as their average rather than as K times a kernel;
- CLME-CondConv is the same layer with experts initialised from the removed layers' kernels
  (`clme_experts`), see `difflax.accel.asdm.surgery.inherit_params`.

Two equivalent implementations (`impl`): "experts" (default) convolves with all K kernels
at once and mixes the K outputs by a (K times the convolution's compute, but plain
convolutions); "vmap" convolves each sample with its own mixed kernel (jax.vmap over the
batch, which XLA lowers to one grouped convolution with the batch folded into feature
groups): CondConv's own form, one convolution's compute, efficient where grouped
convolutions are. On this project's 2-core CPU (B = 250, 16x16, 32 -> 16 channels, K = 4)
"experts" took 0.10 s, "vmap" 0.31 s, a plain convolution 0.018 s.

`CondConvBranch` is the CondConv as the replacement of a pruned UNet block's residual branch
(the `branch` hook of `difflax.models.UNetBlock` and of SD's ResNets).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax.models.layers import Init, conv2d, edm_init

ACTIVATIONS = {None: lambda x: x, "silu": nn.silu, "relu": nn.relu}
IMPLS = ("experts", "vmap")


def _check(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(repr, choices))}")


class CondConv2d(nn.Module):
    """ME-CondConv. x: (B, H, W, C_in), emb: (B, E) or None -> (B, H, W, features).

    Parameters: `experts` (K, k, k, C_in, C_out), `bias` (K, C_out), `route_weight`
    (C_in, K), `route_bias` (K,), and `route_emb` (E, K) when `emb` is passed.
    """

    features: int
    kernel: int = 3
    num_experts: int = 4
    use_bias: bool = True
    activation: str | None = None
    impl: str = "experts"
    weight_init: Init = Init("xavier_uniform")  # EDM-style; `init` would shadow Module.init

    def _mixing_weights(self, x, emb=None):
        """a = sigmoid(GAP(x) R + emb R_emb + r): (B, K)."""
        k = self.num_experts
        logits = x.astype(jnp.float32).mean((1, 2)) @ self.param(
            "route_weight", nn.initializers.zeros, (x.shape[-1], k))
        if emb is not None:
            logits = logits + emb.astype(jnp.float32) @ self.param(
                "route_emb", nn.initializers.zeros, (emb.shape[-1], k))
        bias = self.param("route_bias", nn.initializers.constant(-math.log(max(k - 1, 1e-6))), (k,))
        return jax.nn.sigmoid(logits + bias)

    @nn.compact
    def __call__(self, x, emb=None):
        _check("activation", self.activation, tuple(ACTIVATIONS))
        _check("impl", self.impl, IMPLS)
        cin, k, kk = x.shape[-1], self.num_experts, self.kernel
        fan_in, fan_out = cin * kk * kk, self.features * kk * kk
        init = self.weight_init
        experts = self.param("experts", edm_init(init.mode, fan_in, fan_out, init.weight),
                             (k, kk, kk, cin, self.features))
        a = self._mixing_weights(x, emb).astype(x.dtype)  # (B, K)
        pad = kk // 2
        if self.impl == "vmap":
            kernels = jnp.einsum("bk,kyxio->byxio", a, experts.astype(x.dtype))
            y = jax.vmap(lambda xi, wi: conv2d(xi[None], wi, pad)[0])(x, kernels)
        else:
            stacked = jnp.moveaxis(experts, 0, -2).reshape(kk, kk, cin, k * self.features)
            y = conv2d(x, stacked.astype(x.dtype), pad)
            y = jnp.einsum("bhwko,bk->bhwo", y.reshape(*y.shape[:3], k, self.features), a)
        if self.use_bias:
            bias = self.param("bias", edm_init(init.mode, fan_in, fan_out, init.bias),
                              (k, self.features))
            y = y + (a @ bias.astype(x.dtype))[:, None, None, :]
        return ACTIVATIONS[self.activation](y)


def clme_experts(kernels: Sequence[jax.Array], num_experts: int, *, biases=None):
    """CLME-CondConv initialisation: experts (K, k, k, C_in, C_out) from removed layers' kernels.

    `kernels` are the HWIO kernels of the removed layers whose shape matches the CondConv
    (the cross-layer part: they may come from several removed blocks). They fill the K
    expert slots in order, cycling when there are fewer kernels than experts, and the
    surplus is dropped when there are more. `biases` (same order, (C_out,) each) give the
    expert biases likewise. Returns (experts, biases or None).
    """
    if not kernels:
        raise ValueError("CLME-CondConv needs at least one removed kernel of the layer's shape")
    shapes = {tuple(w.shape) for w in kernels}
    if len(shapes) != 1:
        raise ValueError(f"CLME experts must share one shape, got {sorted(shapes)}")
    pick = [i % len(kernels) for i in range(num_experts)]
    experts = jnp.stack([jnp.asarray(kernels[i]) for i in pick])
    bias = None if biases is None else jnp.stack([jnp.asarray(biases[i]) for i in pick])
    return experts, bias


@dataclasses.dataclass(frozen=True)
class CondConvBranch:
    """A pruned block's residual branch replaced by a K-expert CondConv (ME-CondConv),
    `CondConv2d(C_out, 3, num_experts=experts)` routed by the branch's input and the block's
    embedding. The `branch` hook of `difflax.models.UNetBlock` and of SD's `ResnetBlock`:
    h (B, H, W, C_in), the removed branch's normalised, activated (and resampled) input; emb
    (B, E); features C_out; init the block's `Init` -> (B, H, W, C_out), in the block's
    layer "condconv"."""

    experts: int

    def __call__(self, h, emb, features: int, init: Init):
        return CondConv2d(features, 3, num_experts=self.experts, weight_init=init,
                          name="condconv")(h, emb)
