"""Training: EDM loss, train state, data-parallel step, checkpoints and the loop; SiT's
interpolant loss; A-SDM's distillation loss and pruning stages (its terms in
difflax.accel.asdm; `DistillConfig`, `PruningStage` re-exported). Rectified flows and Reflow
are in `difflax.rfpp`."""
from difflax.training.checkpoint import (CheckpointMismatchError, make_checkpoint_manager,
                                         restore_checkpoint, save_checkpoint)
from difflax.accel.asdm import DistillConfig, PruningStage
from difflax.training.distill import get_distill_loss_fn, init_student_params, progressive_distill
from difflax.training.loop import get_init_params_fn, train
from difflax.models.precond import checked_labels, model_signature
from difflax.training.losses import edm_loss, get_edm_loss_fn
from difflax.mesh import batch_sharded, make_mesh, replicated, shard_batch
from difflax.training.parallel import abstract_train_state, get_train_step_fn, init_train_state
from difflax.training.state import (TrainConfig, TrainState, create_train_state, ema_decay,
                                    ema_update, learning_rate_schedule, make_optimizer)

__all__ = [
    "DistillConfig", "PruningStage", "get_distill_loss_fn", "init_student_params",
    "progressive_distill",
    "CheckpointMismatchError", "TrainConfig", "TrainState", "abstract_train_state",
    "batch_sharded", "checked_labels", "create_train_state", "edm_loss", "ema_decay", "ema_update",
    "get_edm_loss_fn", "get_init_params_fn", "get_train_step_fn", "init_train_state",
    "make_checkpoint_manager", "make_mesh", "make_optimizer", "model_signature", "learning_rate_schedule",
    "replicated", "restore_checkpoint", "save_checkpoint", "shard_batch", "train",
]
