"""Distillation of a pruned student UNet from its teacher, and progressive pruning in stages.

A-SDM (Zhu et al. 2024, "Accelerating Stable Diffusion through Model Assembly and Feature
Inheritance Strategies", Sec. 3.1; and "A-SDM: ... Redundancy Removal and Performance
Optimization", Sec. 3, "progressive incubation" and "semantic-aware supervision"), following
BK-SDM's recipe (Kim et al. 2023): the student is trained on

    L = w_task L_EDM(D_s) + w_out E[lambda(sigma) ||D_s - D_t||^2]
        + w_feat mean_blocks ||f_s - f_t||^2 + w_sem ||phi(D_s) - phi(D_t)||^2

at the same noisy input x + n, sigma drawn as in EDM's loss, lambda(sigma) EDM's weighting
(difflax.training.losses.edm_loss). f are the outputs of the UNet blocks that student and
teacher share by name (surgery keeps names; a pruned block still outputs its shortcut);
phi is a feature network on denoised images, e.g. the digits classifier's 64-d features
(`difflax.metrics.digits_features`): the semantic-aware supervision term (SAS).

The loss has the signature of every difflax training loss, so `difflax.training.train`
runs it with the same data-parallel step, checkpoints, resume and progress logging.
Progressive pruning (`progressive_distill`) is a list of stages, each removing more blocks
from the previous stage's student (initialised from it by name, CLME experts from the
blocks removed in that stage) and distilling for its own number of steps, always against
the original teacher.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from difflax.models.unet_block import UNetBlock
from difflax.training.loop import get_init_params_fn, train
from difflax.training.losses import checked_labels, edm_loss
from difflax.training.state import TrainConfig


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Weights of the distillation loss's terms (0 switches a term off)."""

    task: float = 1.0
    output: float = 1.0
    features: float = 1.0
    semantic: float = 0.0
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5


def _is_block(module, method_name):
    return isinstance(module, UNetBlock) and method_name == "__call__"


def _block_outputs(intermediates) -> dict:
    """{"model/enc_16x16_block0": (B, H, W, C), ...} from Flax's captured intermediates."""
    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(
            intermediates, is_leaf=lambda v: isinstance(v, tuple))[0]:
        names = [getattr(k, "key", str(k)) for k in path if getattr(k, "key", None) != "__call__"]
        value = value[0]
        out["/".join(map(str, names))] = value[0] if isinstance(value, tuple) else value
    return out


def _apply_with_features(model, params, x, sigma, labels, **kwargs):
    out, state = model.apply({"params": params}, x, sigma, labels, capture_intermediates=_is_block,
                             mutable=["intermediates"], **kwargs)
    return out, _block_outputs(state["intermediates"])


def feature_loss(student_features: dict, teacher_features: dict) -> jax.Array:
    """Mean over the blocks both have (same name and shape) of the mean squared difference."""
    shared = [k for k in student_features if k in teacher_features
              and student_features[k].shape == teacher_features[k].shape]
    if not shared:
        return jnp.zeros(())
    return sum(jnp.mean(jnp.square(student_features[k] - teacher_features[k]))
               for k in shared) / len(shared)


def get_distill_loss_fn(student, teacher, teacher_params, *, config: DistillConfig = DistillConfig(),
                        semantic_fn: Callable[[jax.Array], jax.Array] | None = None):
    """Returns loss_fn(params, batch, key) -> scalar, the student's distillation loss.

    student / teacher: Flax denoisers D(x, sigma, labels) (difflax.models.Denoiser);
    teacher_params: the teacher's "params", held fixed. batch = (images (B, H, W, C) in
    [-1, 1], labels (B,) int or None), checked against the student (`checked_labels`). semantic_fn: images (B, H, W, C) -> features (B, D), needed
    when config.semantic > 0. Dropout (student only) draws from `key`.
    """
    if config.semantic and semantic_fn is None:
        raise ValueError("DistillConfig.semantic > 0 needs a semantic_fn (e.g. digits_features)")
    with_features = config.features > 0

    def loss_fn(params, batch, key):
        x, labels = batch
        k_loss, k_dropout = jax.random.split(key)
        onehot = checked_labels(student, x, labels)
        terms = {}

        def denoise(x_noisy, sigma, class_labels):
            kw = dict(train=True, rngs={"dropout": k_dropout})
            if with_features:
                d_s, f_s = _apply_with_features(student, params, x_noisy, sigma, class_labels, **kw)
                d_t, f_t = _apply_with_features(teacher, teacher_params, x_noisy, sigma, class_labels)
                terms["features"] = feature_loss(f_s, jax.lax.stop_gradient(f_t))
            else:
                d_s = student.apply({"params": params}, x_noisy, sigma, class_labels, **kw)
                d_t = teacher.apply({"params": teacher_params}, x_noisy, sigma, class_labels)
            d_t = jax.lax.stop_gradient(d_t)
            weight = (sigma**2 + config.sigma_data**2) / (sigma * config.sigma_data) ** 2
            weight = weight.reshape((-1,) + (1,) * (x.ndim - 1))
            terms["output"] = jnp.mean(weight * jnp.square(d_s - d_t))
            if config.semantic:
                phi_t = jax.lax.stop_gradient(semantic_fn(d_t))
                terms["semantic"] = jnp.mean(jnp.square(semantic_fn(d_s) - phi_t))
            return d_s

        task = edm_loss(denoise, x, key=k_loss, class_labels=onehot, p_mean=config.p_mean,
                        p_std=config.p_std, sigma_data=config.sigma_data)
        return (config.task * task + config.output * terms["output"]
                + config.features * terms.get("features", 0.0)
                + config.semantic * terms.get("semantic", 0.0))

    return loss_fn


# ----------------------------------------------------------------------------
# Progressive pruning ("incubation").


class PruningStage(NamedTuple):
    """One stage: the blocks removed so far (cumulative, EDM names) and its distillation steps."""

    drop_blocks: tuple[str, ...]
    steps: int


def init_student_params(student, source_params, *, dropped=(), clme: bool = True, key=None):
    """The student's parameters: its own initialisation, overwritten by name from `source_params`
    (the teacher's, or the previous stage's student's); CLME experts from `dropped` blocks.
    Returns (params, report) as `difflax.accel.assembly.inherit_params`."""
    from difflax.accel.assembly import inherit_params  # accel builds on training, not v.v.

    # the values are mostly overwritten: a cheap generator compiles ~3x faster than threefry
    key = jax.random.key(0, impl="unsafe_rbg") if key is None else key
    init = get_init_params_fn(student, key)
    shapes = jax.eval_shape(init)
    params, report = inherit_params(shapes, source_params, dropped=dropped, clme=clme)
    if not report["new"]:  # everything inherited: no need to compile the initialisation
        return params, report
    return inherit_params(jax.jit(init)(), source_params, dropped=dropped, clme=clme)


def progressive_distill(make_student: Callable[[tuple[str, ...]], object], teacher, teacher_params,
                        stages: Sequence[PruningStage], cfg: TrainConfig, make_batches,
                        workdir: str, *, config: DistillConfig = DistillConfig(), semantic_fn=None,
                        clme: bool = True, mesh=None, progress: bool = True):
    """Distils a student per stage into workdir/stage<i>; returns (student, ema_params) of the last.

    make_student(drop_blocks) -> Flax denoiser with those blocks removed (e.g. a Denoiser
    over `difflax.accel.assembly.student_config`). Stage i starts from stage i-1's EMA
    parameters (stage 0 from the teacher's) and trains `stage.steps` steps with cfg's
    other settings. A stage whose checkpoint is complete is resumed, not retrained.
    """
    source, previous, student, params = teacher_params, (), None, None
    for i, stage in enumerate(stages):
        drop = tuple(stage.drop_blocks)
        if not set(previous) <= set(drop):
            raise ValueError(f"stage {i} drops {sorted(drop)} but must keep dropping the earlier "
                             f"stages' blocks {sorted(previous)}")
        student = make_student(drop)
        newly = tuple(b for b in drop if b not in previous)
        init, _ = init_student_params(student, source, dropped=newly, clme=clme)
        loss = get_distill_loss_fn(student, teacher, teacher_params, config=config, semantic_fn=semantic_fn)
        state = train(dataclasses.replace(cfg, steps=stage.steps), student, make_batches,
                      os.path.join(workdir, f"stage{i}"), loss_fn=loss, init_params_fn=lambda p=init: p,
                      mesh=mesh, progress=progress)
        source, previous, params = state.ema_params, drop, state.ema_params
    return student, params
