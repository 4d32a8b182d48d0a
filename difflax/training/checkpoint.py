"""Orbax checkpoints of the TrainState: periodic saves, keep-last-N, resume from latest.

Restoring walks back from the newest step: a checkpoint that cannot be read (e.g. a
truncated file) is moved aside to `<step>.corrupt` with a warning and the previous one is
tried. A checkpoint whose tree or shapes differ from the model's (another architecture)
raises CheckpointMismatchError with one line naming the first difference.
"""
from __future__ import annotations

import os
import warnings

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint's parameter tree or shapes do not match the state being restored."""


def make_checkpoint_manager(directory: str, *, keep: int = 3,
                            async_save: bool = True) -> ocp.CheckpointManager:
    """A manager over `directory` (created if missing) keeping the newest `keep` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())


def save_checkpoint(manager: ocp.CheckpointManager, state) -> int:
    """Saves `state` (a pytree with a scalar `step`) under its step; returns the step."""
    step = int(jax.device_get(state.step))
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    return step


def _leaf_shapes(tree) -> dict[str, tuple]:
    def name(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {".".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _first_mismatch(saved: dict, expected: dict) -> str | None:
    order = lambda k: (not k.startswith("params."), k)  # report parameters first
    missing = sorted(expected.keys() - saved.keys(), key=order)
    extra = sorted(saved.keys() - expected.keys(), key=order)
    shapes = sorted((k for k in expected.keys() & saved.keys() if saved[k] != expected[k]),
                    key=order)
    problems = ([f"{k} has shape {saved[k]} in the checkpoint but {expected[k]} in the model"
                 for k in shapes] + [f"{k} is missing from the checkpoint" for k in missing]
                + [f"{k} is in the checkpoint but not in the model" for k in extra])
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
    return problems[0] + more


def _check_compatible(manager, step, abstract_state) -> None:
    metadata = manager.item_metadata(step)
    if metadata is None:  # no metadata to compare: let the restore itself decide
        return
    saved = _leaf_shapes(metadata.tree)
    problem = _first_mismatch(saved, _leaf_shapes(abstract_state))
    if problem:
        raise CheckpointMismatchError(
            f"checkpoint {manager.directory / str(step)} is from another architecture: "
            f"{problem}")


def _move_aside(manager, step) -> None:
    if jax.process_index() == 0:
        path = manager.directory / str(step)
        path.rename(manager.directory / f"{step}.corrupt")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"difflax_ckpt_move_aside_{step}")
    manager.reload()


def _restore_step(manager, step, abstract_state):
    _check_compatible(manager, step, abstract_state)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restores the newest readable checkpoint into the structure, dtypes and shardings of
    `abstract_state` (e.g. `parallel.abstract_train_state`); None if there is none. With
    `step`, that checkpoint (an error listing the saved steps if there is none)."""
    if step is not None:
        if step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {manager.directory}; "
                                    f"saved steps: {sorted(manager.all_steps())}")
        return _restore_step(manager, step, abstract_state)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return _restore_step(manager, step, abstract_state)
        except CheckpointMismatchError:
            raise
        except Exception as error:  # unreadable: move it aside and try the previous one
            reason = (str(error).splitlines() or [""])[0][:200]
            warnings.warn(f"checkpoint step {step} in {manager.directory} is unreadable "
                          f"({type(error).__name__}: {reason}); moved to {step}.corrupt, "
                          "falling back to the previous checkpoint")
            _move_aside(manager, step)
    return None
