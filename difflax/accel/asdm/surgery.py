"""A-SDM model assembly: students by surgery, initialised from the teacher (CLME), their cost.

Zhu et al., "A-SDM: Accelerating Stable Diffusion through Model Assembly and Feature
Inheritance Strategies" (2024), Sec. 3 (model assembly, ME-CondConv), and "A-SDM: ...
Redundancy Removal and Performance Optimization" (2023), Sec. 3 (block pruning with
progressive incubation, CLME-CondConv, GRI attention).

`student` turns A-SDM's choices into the UNet's generic surgery (`difflax.models.Surgery`,
hooks of `difflax.models.UNetBlock`): a block named in `drop_blocks` loses its residual branch
(norm0 -> conv0 -> affine -> norm1 -> conv1) and keeps its shortcut (identity, or the 1x1
projection with resampling), so the tensor shapes, the skip connections (and `skip_scales`)
of the teacher are unchanged and every kept parameter keeps its name. With `condconv_experts
= K > 0` the removed branch is replaced by a K-expert CondConv (ME-CondConv,
`CondConvBranch`); initialising its experts from the removed kernels (`inherit_params(...,
clme=True)`) makes it CLME-CondConv. `drop_attention` removes a block's attention unit, and
`attention="gri"` makes every remaining attention unit GRI attention (`GRIConfig`). Block
names are the feature nodes' (EDM's): "enc.16x16_block0", "dec.4x4_in0", ...;
`difflax.models.prunable_blocks` lists them, `feature_nodes` says which have attention.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from difflax.accel.asdm.condconv import CondConvBranch, clme_experts
from difflax.accel.asdm.gri import GRIConfig
from difflax.models.precond import Denoiser
from difflax.models.unet import Surgery, feature_nodes

ATTENTIONS = ("full", "gri")


def student(teacher: Denoiser, *, drop_blocks=(), drop_attention=(), condconv_experts: int = 0,
            attention: str = "full", gri_window: int = 4, gri_pool: int = 2,
            gri_combine: str = "joint") -> Denoiser:
    """The teacher's denoiser with A-SDM surgery (replacing the teacher's own surgery).

    drop_blocks / drop_attention: block names (residual branches / attention units removed);
    condconv_experts: K > 0 replaces each removed branch by a K-expert CondConv, 0 leaves
    the shortcut alone; attention: "full" or "gri" (GRI attention with `gri_window`,
    `gri_pool`, `gri_combine`, see `GRIConfig`). Everything is validated here, the errors
    naming the valid choices.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; valid choices: "
                         f"{', '.join(map(repr, ATTENTIONS))}")
    if condconv_experts < 0:
        raise ValueError(f"condconv_experts must be >= 0 (0: no CondConv), not {condconv_experts}")
    gri = GRIConfig(gri_window, gri_pool, gri_combine) if attention == "gri" else None
    surgery = Surgery(drop_blocks, drop_attention,
                      branch=CondConvBranch(condconv_experts) if condconv_experts else None,
                      attention=gri)
    net = dataclasses.replace(teacher.net, surgery=surgery)
    if gri is not None:
        for res in {n.resolution for n in feature_nodes(net)
                    if n.attention and n.name not in surgery.drop_attention}:
            gri.check(res, res)
    return teacher.clone(net=net)


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
    cross-layer inheritance; see `clme_experts`.

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
