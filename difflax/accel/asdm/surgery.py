"""A-SDM model assembly: students by surgery, initialised from the teacher (CLME), their cost.

Zhu et al., "A-SDM: Accelerating Stable Diffusion through Model Assembly and Feature
Inheritance Strategies" (2024), Sec. 3 (model assembly, ME-CondConv), and "A-SDM: ...
Redundancy Removal and Performance Optimization" (2023), Sec. 3 (block pruning with
progressive incubation, CLME-CondConv, GRI attention).

`student` turns A-SDM's choices into the UNet's generic surgery (`difflax.models.Surgery`,
hooks of `difflax.models.UNetBlock` and of SD's `ResnetBlock` / `Attention`), on EDM's
UNets and on Stable Diffusion's (the networks the papers prune): a block named in
`drop_blocks` loses its residual branch (EDM: norm0 -> conv0 -> affine -> norm1 -> conv1;
SD's ResnetBlock2D: norm1 -> conv1 -> time_emb_proj -> norm2 -> conv2) and keeps its
shortcut (identity, or the 1x1 projection, with resampling in EDM), so the tensor shapes,
the skip connections (and `skip_scales`) of the teacher are unchanged and every kept
parameter keeps its name (SD's: diffusers'). With `condconv_experts = K > 0` the removed
branch is replaced by a K-expert CondConv (ME-CondConv, `CondConvBranch`); initialising its
experts from the removed kernels (`inherit_params(..., clme=True)`) makes it CLME-CondConv.
`drop_attention` removes a node's attention unit (SD: its transformer), and
`attention="gri"` makes every remaining (self-)attention GRI attention (`GRIConfig`). Block
names: `difflax.models.prunable_blocks(model)` lists them (EDM's feature nodes,
"enc.16x16_block0", "dec.4x4_in0", ...; SD's "down_blocks_1.layer_0", ...,
"mid_block.resnets_0", "mid_block.resnets_1", "up_blocks_0.layer_2", ...), the feature
graph says which nodes have attention.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from difflax.accel.asdm.condconv import CondConvBranch, clme_experts
from difflax.accel.asdm.gri import GRIConfig
from difflax.models.graph import feature_graph
from difflax.models.precond import Denoiser
from difflax.models.unet import Surgery, block_params, edm_block_path

ATTENTIONS = ("full", "gri")


def student(teacher, *, drop_blocks=(), drop_attention=(), condconv_experts: int = 0,
            attention: str = "full", gri_window: int = 4, gri_pool: int = 2,
            gri_combine: str = "joint"):
    """The teacher with A-SDM surgery (replacing the teacher's own surgery): an EDM
    `Denoiser` (its `net`, a `UNetConfig`, edited) or an `SDUNet` (its `config`, an
    `SDUNetConfig`), returned as the same kind of module.

    drop_blocks / drop_attention: block names (residual branches, `prunable_blocks(teacher)`
    / attention units, feature nodes with attention) removed; condconv_experts: K > 0
    replaces each removed branch by a K-expert CondConv, 0 leaves the shortcut alone;
    attention: "full" or "gri" (GRI attention with `gri_window`, `gri_pool`, `gri_combine`,
    see `GRIConfig`; on SD's UNet it replaces the self-attention). Everything is validated
    here, the errors naming the valid choices.
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
    field = "net" if isinstance(teacher, Denoiser) else "config"
    net = dataclasses.replace(getattr(teacher, field), surgery=surgery)
    if gri is not None:
        for res in {n.resolution for n in feature_graph(net)
                    if n.attention and n.name not in surgery.drop_attention}:
            gri.check(res, res)
    return teacher.clone(**{field: net})


# ----------------------------------------------------------------------------
# Initialising a student from its teacher.


def _block_path(flat_paths, keys):
    """The flattened path of the block whose parameters are at `keys` (under the pytree's
    root: "model" for a Denoiser's, "params" for SD's variables), or None."""
    for path in flat_paths:
        parts = tuple(path.split("/"))
        for i in range(len(parts) - len(keys)):
            if parts[i:i + len(keys)] == keys:
                return "/".join(parts[:i + len(keys)])
    return None


def _removed_kernels(flat_t, student_layers, blocks, shape):
    """HWIO kernels (and biases) with `shape` of the teacher's layers under the flattened
    block paths `blocks` that the student no longer has (the removed branches' convolutions:
    EDM's conv0, conv1; SD's conv1, conv2), block by block, in layer-name order."""
    kernels, biases = [], []
    for block in blocks:
        for path in sorted(p for p in flat_t if p.startswith(block + "/")):
            layer, leaf = path.rsplit("/", 1)
            if (leaf in ("weight", "kernel") and layer.rsplit("/", 1)[0] == block
                    and layer not in student_layers
                    and tuple(flat_t[path].shape) == tuple(shape)):
                kernels.append(flat_t[path])
                biases.append(flat_t[layer + "/bias"])
    return kernels, biases


def _clme(out, new, flat_t, dropped_blocks):
    """Fills the new CondConv experts in `out` from the removed kernels (CLME-CondConv);
    removes them from `new`; returns {block key: n_distinct_kernels}."""
    student_layers = {path.rsplit("/", 1)[0] for path in out}
    paths = {key: _block_path(flat_t, key) for key in dropped_blocks}
    order = [paths[key] for key in dropped_blocks if paths[key] is not None]
    clme = {}
    for path in [p for p in new if p.endswith("/condconv/experts")]:
        block = path[:-len("/condconv/experts")]
        nearest = (sorted(order, key=lambda b: abs(order.index(b) - order.index(block)))
                   if block in order else order)
        experts = out[path]
        kernels, biases = _removed_kernels(flat_t, student_layers, nearest, experts.shape[1:])
        if not kernels:
            continue
        w, b = clme_experts(kernels, experts.shape[0], biases=biases)
        out[path] = w.astype(experts.dtype)
        new.remove(path)
        if block + "/condconv/bias" in new:
            out[block + "/condconv/bias"] = b.astype(out[block + "/condconv/bias"].dtype)
            new.remove(block + "/condconv/bias")
        key = next((k for k, p in paths.items() if p == block), tuple(block.split("/")))
        clme["/".join(key)] = min(len(kernels), experts.shape[0])
    return clme


def inherit_params(student_params, teacher_params, *, dropped=(), clme: bool = True,
                   model=None):
    """The student's parameters, taken from the teacher by name wherever the shapes agree.

    student_params / teacher_params: a `Denoiser`'s "params" ({"model": {...}}) or an
    `SDUNet`'s variables ({"params": {...}}); the student's own values (its random
    initialisation) are kept where the teacher has no parameter of that name and shape, e.g.
    a CondConv's routing. With `clme`, the experts of the CondConv that replaces block b
    (`dropped` lists the removed blocks' names, in execution order) are the removed kernels
    of b itself first (EDM's conv0, conv1; SD's conv1, conv2; where the shape fits), then
    those of the other removed blocks, nearest first: CLME-CondConv's cross-layer
    inheritance; see `clme_experts`. model: the student (or its config), whose
    `block_params` locate the named blocks' parameters; None: an EDM UNet's naming.

    Returns (params, report) with report = {"inherited": n_leaves, "new": [paths], "clme":
    {block's parameter path: n_distinct_kernels}}.
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
    if clme and dropped:
        blocks = (block_params(model) if model is not None
                  else {name: edm_block_path(name) for name in dropped})
        unknown = [name for name in dropped if name not in blocks]
        if unknown:
            raise ValueError(f"dropped blocks {unknown} are not blocks of the model; valid "
                             f"choices: {', '.join(map(repr, blocks))}")
        report["clme"] = _clme(out, new, flat_t, [blocks[name] for name in dropped])
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
