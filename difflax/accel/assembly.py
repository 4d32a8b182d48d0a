"""A-SDM model assembly: UNet surgery, students initialised from the teacher, cost, switching.

Zhu et al., "A-SDM: Accelerating Stable Diffusion through Model Assembly and Feature
Inheritance Strategies" (2024), Sec. 3 (model assembly, ME-CondConv, multi-UNet switching),
and "A-SDM: ... Redundancy Removal and Performance Optimization" (2023), Sec. 3 (block
pruning with progressive incubation, CLME-CondConv, GRI attention).

Surgery is by config (`UNetConfig.surgery`, a `difflax.models.unet.Surgery`): a block named in
`drop_blocks` loses its residual branch (norm0 -> conv0 -> affine -> norm1 -> conv1) and keeps
its shortcut (identity, or the 1x1 projection with resampling), so the tensor shapes, the skip
connections (and `skip_scales`) of the teacher are unchanged and every kept parameter keeps its
name. With `condconv_experts = K > 0` the removed branch is replaced by a K-expert CondConv
(ME-CondConv); initialising its experts from the removed kernels (`inherit_params(...,
clme=True)`) makes it CLME-CondConv. `drop_attention` removes a block's attention unit, and
`attention="gri"` makes every remaining attention unit GRI attention. Block names are the feature
nodes' (EDM's): "enc.16x16_block0", "dec.4x4_in0", ...; `difflax.models.unet.prunable_blocks`
lists them, `feature_nodes` says which have attention.

Multi-UNet switching (A-SDM, Sec. 3.3): the full model for the early, noisy steps and the
light one for the later ones; `MultiUNetDenoiser` is a denoiser that samplers and
`difflax.workdir.get_sample_fn` accept like any other.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from difflax.models.condconv import clme_experts
from difflax.models.precond import Denoiser


def student(teacher: Denoiser, **surgery) -> Denoiser:
    """The teacher's denoiser with A-SDM surgery: fields of `Surgery` (`drop_blocks`,
    `drop_attention`, `condconv_experts`, `attention`, `gri_window`, `gri_pool`,
    `gri_combine`) replacing the teacher's (validated, naming the valid choices)."""
    net = teacher.net
    return teacher.clone(net=dataclasses.replace(
        net, surgery=dataclasses.replace(net.surgery, **surgery)))


# ----------------------------------------------------------------------------
# Initialising a student from its teacher.


def _removed_kernels(teacher_model_params, block_param_names, shape):
    """HWIO kernels (and biases) of the removed convolutions of the given blocks with `shape`."""
    kernels, biases = [], []
    for name in block_param_names:
        for conv in ("conv0", "conv1"):
            layer = teacher_model_params.get(name, {}).get(conv)
            if layer is not None and tuple(layer["weight"].shape) == tuple(shape):
                kernels.append(layer["weight"])
                biases.append(layer["bias"])
    return kernels, biases


def inherit_params(student_params, teacher_params, *, dropped=(), clme: bool = True):
    """The student's parameters, taken from the teacher by name wherever the shapes agree.

    student_params / teacher_params: a `Denoiser`'s "params" ({"model": {...}}); the
    student's own values (its random initialisation) are kept where the teacher has no
    parameter of that name and shape, e.g. a CondConv's routing. With `clme`, the experts of
    the CondConv that replaces block b (`dropped` lists the removed blocks' EDM names, in
    execution order) are the removed kernels of b itself first (conv0, conv1, where the
    shape fits), then those of the other removed blocks, nearest first: CLME-CondConv's
    cross-layer inheritance; see `difflax.models.condconv.clme_experts`.

    Returns (params, report) with report = {"inherited": n_leaves, "new": [paths], "clme":
    {block: n_distinct_kernels}}.
    """
    flat_t = traverse_util.flatten_dict(teacher_params, sep="/")
    flat_s = traverse_util.flatten_dict(student_params, sep="/")
    out, new = {}, []
    for path, value in flat_s.items():
        source = flat_t.get(path)
        if source is not None and source.shape == value.shape:
            out[path] = jnp.asarray(source, value.dtype)
        else:
            out[path] = value
            new.append(path)
    report = {"inherited": len(flat_s) - len(new), "new": new, "clme": {}}
    if clme:
        model_t = teacher_params["model"]
        names = [n.replace(".", "_", 1) for n in dropped]
        for path in list(new):
            parts = path.split("/")
            if parts[-2:] != ["condconv", "experts"]:
                continue
            block = parts[-3]
            order = (sorted(names, key=lambda n: abs(names.index(n) - names.index(block)))
                     if block in names else names)
            experts = out[path]
            kernels, biases = _removed_kernels(model_t, order, experts.shape[1:])
            if not kernels:
                continue
            w, b = clme_experts(kernels, experts.shape[0], biases=biases)
            out[path] = w.astype(experts.dtype)
            bias_path = "/".join(parts[:-1] + ["bias"])
            if bias_path in out:
                out[bias_path] = b.astype(out[bias_path].dtype)
                new.remove(bias_path)
            new.remove(path)
            report["clme"][block] = min(len(kernels), experts.shape[0])
        report["inherited"] = len(flat_s) - len(new)
    return traverse_util.unflatten_dict(out, sep="/"), report


# ----------------------------------------------------------------------------
# Cost.


def count_params(params) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def denoiser_flops(denoiser, params, batch_size: int = 1) -> float:
    """FLOPs of one D(x; sigma) call on `batch_size` images, from XLA's cost analysis.

    Takes abstract or concrete params (only shapes are used). The count is XLA's analysis of
    the lowered program (convolutions, matmuls, elementwise ops; nothing is compiled), so it
    is comparable between a teacher and its students lowered the same way.
    """
    net = denoiser.net
    x = jax.ShapeDtypeStruct((batch_size, net.img_resolution, net.img_resolution,
                              net.in_channels), jnp.float32)
    sigma = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32) if net.label_dim else None
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    fn = jax.jit(lambda p, x, s, l: denoiser.apply({"params": p}, x, s, l))
    cost = fn.lower(params, x, sigma, labels).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


# ----------------------------------------------------------------------------
# Multi-UNet switching.


def switch_sigma(grid, step: int) -> float:
    """The threshold that gives grid points 0 .. step-1 to the full model, the rest to the light.

    grid: the sampler's decreasing time grid (time = sigma on EDM's schedule); the threshold
    is the geometric mean of grid[step - 1] and grid[step]. step = 0: all light; step >=
    len(grid): all full.
    """
    g = np.asarray(grid, np.float64)
    if step <= 0:
        return math.inf
    if step >= len(g):
        return -math.inf
    lo = max(float(g[step]), 1e-12)
    return float(math.sqrt(float(g[step - 1]) * lo))


class MultiUNetDenoiser(nn.Module):
    """D(x; sigma) = full(x; sigma) if sigma > switch else light(x; sigma) (A-SDM multi-UNet).

    Parameters {"full": full's params, "light": light's params}. sigma: () or (B,), the same
    for the whole batch, as samplers call it (the first entry decides). Under `jit` only the
    chosen model runs (`lax.cond`); under `vmap` over sigma both would run. `net` is the light
    model's UNetConfig, so `difflax.workdir.get_sample_fn` takes this module as a denoiser.
    """

    full: Denoiser
    light: Denoiser
    switch: float

    def __post_init__(self):
        if self.full is self.light:  # one instance would be bound once, sharing its parameters
            object.__setattr__(self, "light", self.light.clone())
        super().__post_init__()

    @property
    def net(self):
        return self.light.net

    @property
    def input_shape(self):
        return self.light.input_shape

    @property
    def label_dim(self):
        return self.light.label_dim

    @nn.compact
    def __call__(self, x, sigma, class_labels=None, **kwargs):
        s = jnp.asarray(sigma, jnp.float32).reshape(-1)[0]
        if self.is_initializing():  # lax.cond needs both branches' parameters to exist
            full = self.full(x, sigma, class_labels, **kwargs)
            return jnp.where(s > self.switch, full, self.light(x, sigma, class_labels, **kwargs))
        return nn.cond(s > self.switch,
                       lambda m, x: m.full(x, sigma, class_labels, **kwargs),
                       lambda m, x: m.light(x, sigma, class_labels, **kwargs), self, x)


def get_multi_unet_fn(full_fn: Callable, light_fn: Callable, switch: float) -> Callable:
    """model_fn(x, t) for `difflax.sample` from two model functions: full_fn where t > switch."""

    def model_fn(x, t):
        s = jnp.asarray(t).reshape(-1)[0]
        return jax.lax.cond(s > switch, full_fn, light_fn, x, t)

    return model_fn
