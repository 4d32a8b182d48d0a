"""Data-parallel training over the mesh of `difflax.mesh`: the train state replicated, the
batch split along "data", one jitted step.

Optimiser state is replicated like the parameters; per-step randomness comes from
`jax.random.fold_in(key, step)`, so results do not depend on the device count (up to float
reduction order).
"""
from __future__ import annotations

from typing import Callable

import jax
import optax
from jax.sharding import Mesh

from difflax.mesh import batch_sharded, replicated
from difflax.training.state import TrainState, create_train_state, ema_update


def init_train_state(init_params_fn: Callable[[], object], tx: optax.GradientTransformation,
                     mesh: Mesh) -> TrainState:
    """Builds a fresh TrainState directly with replicated sharding (one jit, no host copy).

    init_params_fn() -> params must be pure (its randomness from a fixed key).
    """
    init = jax.jit(lambda: create_train_state(init_params_fn(), tx),
                   out_shardings=replicated(mesh))
    return init()


def abstract_train_state(init_params_fn, tx, mesh: Mesh) -> TrainState:
    """Shapes, dtypes and shardings of `init_train_state`, without computing it."""
    shapes = jax.eval_shape(lambda: create_train_state(init_params_fn(), tx))
    sharding = replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        shapes)


def get_train_step_fn(loss_fn, tx: optax.GradientTransformation, ema_decay_fn, mesh: Mesh,
                      lr_fn: Callable | None = None):
    """Returns the jitted step(state, batch, key) -> (state, metrics).

    loss_fn(params, batch, key) -> scalar, mean over the global batch. ema_decay_fn(step)
    -> scalar. The step's randomness is fold_in(key, state.step). The input state is
    donated; metrics are replicated scalars {"loss", "grad_norm"} (plus "lr" if lr_fn).
    """

    def step(state: TrainState, batch, key):
        step_key = jax.random.fold_in(key, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, step_key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay_fn(state.step))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if lr_fn is not None:
            metrics["lr"] = lr_fn(state.step)
        new = state.replace(step=state.step + 1, params=params, ema_params=ema,
                            opt_state=opt_state)
        return new, metrics

    repl = replicated(mesh)
    return jax.jit(step, in_shardings=(repl, batch_sharded(mesh), repl),
                   out_shardings=(repl, repl), donate_argnums=0)
