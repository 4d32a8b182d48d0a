"""Training: EDM loss, train state, data-parallel step, checkpoints and the loop."""
from difflax.training.checkpoint import (CheckpointMismatchError, make_checkpoint_manager,
                                         restore_checkpoint, save_checkpoint)
from difflax.training.loop import get_init_params_fn, train
from difflax.training.losses import edm_loss, get_edm_loss_fn
from difflax.training.parallel import (abstract_train_state, batch_sharded,
                                       get_train_step_fn, init_train_state, make_mesh,
                                       replicated, shard_batch)
from difflax.training.state import (TrainConfig, TrainState, create_train_state, ema_decay,
                                    ema_update, learning_rate_schedule, make_optimizer)

__all__ = [
    "CheckpointMismatchError", "TrainConfig", "TrainState", "abstract_train_state",
    "batch_sharded", "create_train_state", "edm_loss", "ema_decay", "ema_update",
    "get_edm_loss_fn", "get_init_params_fn", "get_train_step_fn", "init_train_state",
    "make_checkpoint_manager", "make_mesh", "make_optimizer", "learning_rate_schedule",
    "replicated", "restore_checkpoint", "save_checkpoint", "shard_batch", "train",
]
