"""A-SDM's distillation: the loss's terms and its pruning stages.

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

Here: the weights (`DistillConfig`), the student's denoiser as EDM's loss calls it, recording
the teacher terms of each call (`distill_denoiser`), the weighted sum (`distill_loss`), and
the stages of progressive pruning (`PruningStage`). The training level composes them with
EDM's task loss and runs the stages through the training loop
(`difflax.training.distill`: `get_distill_loss_fn`, `progressive_distill`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from difflax.models.unet_block import UNetBlock


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Weights of the distillation loss's terms (0 switches a term off), and EDM's sigma
    distribution and sigma_data for the task term and lambda(sigma)."""

    task: float = 1.0
    output: float = 1.0
    features: float = 1.0
    semantic: float = 0.0
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5


class PruningStage(NamedTuple):
    """One stage: the blocks removed so far (cumulative, EDM names) and its distillation steps."""

    drop_blocks: tuple[str, ...]
    steps: int


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


def distill_denoiser(student, teacher, teacher_params, params, terms: dict, *,
                     config: DistillConfig, semantic_fn: Callable | None = None, rngs=None):
    """denoise(x_noisy (B, H, W, C), sigma (B,), class_labels) -> D_s: the student with
    `params` (in training mode, dropout from `rngs`), recording in `terms` the output term
    E[lambda(sigma) ||D_s - D_t||^2], the block-feature term (if config.features) and the
    semantic term (if config.semantic) against the teacher at the same input."""
    with_features = config.features > 0

    def denoise(x_noisy, sigma, class_labels):
        kw = dict(train=True, rngs=rngs)
        if with_features:
            d_s, f_s = _apply_with_features(student, params, x_noisy, sigma, class_labels, **kw)
            d_t, f_t = _apply_with_features(teacher, teacher_params, x_noisy, sigma, class_labels)
            terms["features"] = feature_loss(f_s, jax.lax.stop_gradient(f_t))
        else:
            d_s = student.apply({"params": params}, x_noisy, sigma, class_labels, **kw)
            d_t = teacher.apply({"params": teacher_params}, x_noisy, sigma, class_labels)
        d_t = jax.lax.stop_gradient(d_t)
        weight = (sigma**2 + config.sigma_data**2) / (sigma * config.sigma_data) ** 2
        weight = weight.reshape((-1,) + (1,) * (x_noisy.ndim - 1))
        terms["output"] = jnp.mean(weight * jnp.square(d_s - d_t))
        if config.semantic:
            phi_t = jax.lax.stop_gradient(semantic_fn(d_t))
            terms["semantic"] = jnp.mean(jnp.square(semantic_fn(d_s) - phi_t))
        return d_s

    return denoise


def distill_loss(config: DistillConfig, task, terms: dict):
    """L = w_task task + w_out output + w_feat features + w_sem semantic (absent terms 0)."""
    return (config.task * task + config.output * terms["output"]
            + config.features * terms.get("features", 0.0)
            + config.semantic * terms.get("semantic", 0.0))
