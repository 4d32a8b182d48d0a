"""A-SDM's distillation at the training level: the loss in the training loop, progressive pruning.

The loss's terms and weights are A-SDM's (difflax.accel.asdm.distill, with the paper's
equation); here they are composed with EDM's task loss (`edm_loss`) into a loss with the
signature of every difflax training loss, so `difflax.training.train` runs it with the same
data-parallel step, checkpoints, resume and progress logging. Progressive pruning
(`progressive_distill`, A-SDM's "progressive incubation") is a list of `PruningStage`s, each
removing more blocks from the previous stage's student (initialised from it by name, CLME
experts from the blocks removed in that stage, `difflax.accel.asdm.inherit_params`) and
distilling for its own number of steps, always against the original teacher.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import jax

from difflax.accel.asdm import (DistillConfig, PruningStage, distill_denoiser, distill_loss,
                                inherit_params)
from difflax.training.loop import get_init_params_fn, train
from difflax.training.losses import checked_labels, edm_loss
from difflax.training.state import TrainConfig


def get_distill_loss_fn(student, teacher, teacher_params, *, config: DistillConfig = DistillConfig(),
                        semantic_fn: Callable[[jax.Array], jax.Array] | None = None):
    """Returns loss_fn(params, batch, key) -> scalar, the student's distillation loss.

    student / teacher: Flax denoisers D(x, sigma, labels) (difflax.models.Denoiser);
    teacher_params: the teacher's "params", held fixed. batch = (images (B, H, W, C) in
    [-1, 1], labels (B,) int or None), checked against the student (`checked_labels`).
    semantic_fn: images (B, H, W, C) -> features (B, D), needed when config.semantic > 0.
    Dropout (student only) draws from `key`.
    """
    if config.semantic and semantic_fn is None:
        raise ValueError("DistillConfig.semantic > 0 needs a semantic_fn (e.g. digits_features)")

    def loss_fn(params, batch, key):
        x, labels = batch
        k_loss, k_dropout = jax.random.split(key)
        onehot = checked_labels(student, x, labels)
        terms = {}
        denoise = distill_denoiser(student, teacher, teacher_params, params, terms, config=config,
                                   semantic_fn=semantic_fn, rngs={"dropout": k_dropout})
        task = edm_loss(denoise, x, key=k_loss, class_labels=onehot, p_mean=config.p_mean,
                        p_std=config.p_std, sigma_data=config.sigma_data)
        return distill_loss(config, task, terms)

    return loss_fn


def init_student_params(student, source_params, *, dropped=(), clme: bool = True, key=None):
    """The student's parameters: its own initialisation, overwritten by name from `source_params`
    (the teacher's, or the previous stage's student's); CLME experts from `dropped` blocks.
    Returns (params, report) as `difflax.accel.asdm.inherit_params`."""
    # the values are mostly overwritten: a cheap generator compiles ~3x faster than threefry
    key = jax.random.key(0, impl="unsafe_rbg") if key is None else key
    init = get_init_params_fn(student, key)
    shapes = jax.eval_shape(init)
    params, report = inherit_params(shapes, source_params, dropped=dropped, clme=clme,
                                    model=student)
    if not report["new"]:  # everything inherited: no need to compile the initialisation
        return params, report
    return inherit_params(jax.jit(init)(), source_params, dropped=dropped, clme=clme,
                          model=student)


def progressive_distill(make_student: Callable[[tuple[str, ...]], object], teacher, teacher_params,
                        stages: Sequence[PruningStage], cfg: TrainConfig, make_batches,
                        workdir: str, *, config: DistillConfig = DistillConfig(), semantic_fn=None,
                        clme: bool = True, mesh=None, progress: bool = True):
    """Distils a student per stage into workdir/stage<i>; returns (student, ema_params) of the last.

    make_student(drop_blocks) -> Flax denoiser with those blocks removed (e.g.
    `difflax.accel.asdm.student(teacher, drop_blocks=drop_blocks, ...)`). Stage i starts from
    stage i-1's EMA parameters (stage 0 from the teacher's) and trains `stage.steps` steps
    with cfg's other settings. A stage whose checkpoint is complete is resumed, not retrained.
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
        get_loss_fn = lambda s: get_distill_loss_fn(s, teacher, teacher_params, config=config,
                                                    semantic_fn=semantic_fn)
        state = train(dataclasses.replace(cfg, steps=stage.steps), student, make_batches,
                      os.path.join(workdir, f"stage{i}"), get_loss_fn=get_loss_fn,
                      init_params_fn=lambda p=init: p,
                      mesh=mesh, progress=progress)
        source, previous, params = state.ema_params, drop, state.ema_params
    return student, params
