"""Training configuration, the train state pytree, the optimiser and the parameter EMA.

References:
    Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models"
    (EDM), NeurIPS 2022, Appendix F.1: EMA half-life in images, with a ramp-up.
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (AdamW), ICLR 2019.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Typed training hyper-parameters (the CLI builds this once from a config).

    EMA: if `ema_decay` is set it is a constant per-step decay; otherwise the decay follows
    EDM's half-life in images, beta = 0.5 ** (batch_size / halflife_nimg), with
    halflife_nimg = min(1000 * ema_halflife_kimg, images_seen * ema_rampup_ratio) (no
    ramp-up if `ema_rampup_ratio` is None). `*_every` count optimiser steps; 0 disables.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float | None = None
    ema_halflife_kimg: float = 500.0
    ema_rampup_ratio: float | None = 0.05
    ema_decay: float | None = None
    log_every: int = 50
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 0
    seed: int = 0
    tensorboard: bool = False  # also write TensorBoard events (needs tensorboardX)
    wandb: str = ""  # a W&B project name: also log to Weights & Biases ("": off; needs wandb)
    # the model computes in this dtype on float32 parameters (the `dtype` of a Denoiser or SiT)
    compute_dtype: str = "float32"


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs, as one pytree of arrays.

    step: int32 scalar, the number of optimiser steps taken. params / ema_params: the
    model's 'params' collection and its EMA. opt_state: the optax state of `make_optimizer`.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to cfg.lr over cfg.warmup_steps, then constant."""
    if cfg.warmup_steps <= 0:
        return optax.constant_schedule(cfg.lr)
    return optax.warmup_constant_schedule(0.0, cfg.lr, cfg.warmup_steps)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up (and global-norm clipping if cfg.grad_clip is set)."""
    adamw = optax.adamw(learning_rate_schedule(cfg), weight_decay=cfg.weight_decay)
    if cfg.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)


def ema_decay(cfg: TrainConfig, step: jax.Array) -> jax.Array:
    """EMA decay used for the update after optimiser step `step` (0-based), a scalar."""
    if cfg.ema_decay is not None:
        return jnp.asarray(cfg.ema_decay, jnp.float32)
    halflife = jnp.asarray(cfg.ema_halflife_kimg * 1000.0, jnp.float32)
    if cfg.ema_rampup_ratio is not None:
        seen = jnp.asarray(step, jnp.float32) * cfg.batch_size
        halflife = jnp.minimum(halflife, seen * cfg.ema_rampup_ratio)
    return 0.5 ** (cfg.batch_size / jnp.maximum(halflife, 1e-8))


def ema_update(ema_params, params, decay: jax.Array):
    """ema <- decay * ema + (1 - decay) * params, leaf-wise."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def create_train_state(params, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state at step 0: EMA starts at the parameters."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))
