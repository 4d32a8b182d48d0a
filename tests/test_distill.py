"""Distillation loss (output, features, semantic-aware) and progressive pruning through the loop."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import data
from difflax.accel import asdm
from difflax.accel.asdm import DistillConfig, PruningStage, feature_loss
from difflax.models import Denoiser, ddpmpp
from difflax.training import TrainConfig
from difflax.training.distill import get_distill_loss_fn, init_student_params, progressive_distill
from difflax.training.loop import get_init_params_fn

NET = ddpmpp(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=8,
             channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0)
TEACHER = Denoiser(net=NET)
BATCH = (np.asarray(data.load_digits(8)[0][:8]), np.arange(8) % 10)
SEMANTIC = lambda x: x.reshape(x.shape[0], -1)[:, ::3]  # a fixed "feature network"


@pytest.fixture(scope="module")
def teacher_params():
    shapes = jax.eval_shape(get_init_params_fn(TEACHER, jax.random.key(0)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)


def test_feature_loss_compares_shared_blocks():
    a = {"x": jnp.ones((2, 3)), "y": jnp.zeros((2, 2)), "only_student": jnp.ones(1)}
    b = {"x": jnp.zeros((2, 3)), "y": jnp.ones((2, 2)) * 3, "only_teacher": jnp.ones(1)}
    assert float(feature_loss(a, b)) == pytest.approx((1.0 + 9.0) / 2)
    assert float(feature_loss({"x": jnp.ones(2)}, {"x": jnp.ones(3)})) == 0.0


def test_distill_terms_vanish_for_the_teacher_itself(teacher_params):
    """Output, feature and semantic terms are zero for student == teacher and grow with the
    difference; the task term is the EDM loss."""
    config = DistillConfig(task=0.0, output=1.0, features=1.0, semantic=1.0)
    loss = jax.jit(get_distill_loss_fn(TEACHER, TEACHER, teacher_params,
                                       config=config, semantic_fn=SEMANTIC))
    key = jax.random.key(3)
    assert abs(float(loss(teacher_params, BATCH, key))) < 1e-10
    off = [float(loss(jax.tree.map(lambda p: p * (1 + e), teacher_params), BATCH, key))
           for e in (0.05, 0.2)]
    assert 0 < off[0] < off[1]
    with pytest.raises(ValueError, match="semantic_fn"):
        get_distill_loss_fn(TEACHER, TEACHER, teacher_params, config=config)


def test_progressive_distill_runs_stages_through_the_training_loop(teacher_params, tmp_path):
    """Two stages (one block, then two) in the normal loop: checkpoints, metrics, a student
    of the last stage's architecture, closer to the teacher than at its start. (CLME and
    CondConv students: tests/test_assembly.py; their initialisation takes a compilation.)"""
    drop = ("dec.4x4_in1", "enc.8x8_block0")
    make = lambda blocks: asdm.student(TEACHER, drop_blocks=blocks)
    cfg = TrainConfig(batch_size=8, lr=3e-3, warmup_steps=1, ema_decay=0.0, log_every=4,
                      ckpt_every=100, keep_checkpoints=1)
    make_batches = lambda start: data.batch_iterator("digits", 8, seed=0, start_step=start,
                                                     resolution=8)
    config = DistillConfig(task=0.0, output=1.0, features=1.0)
    stages = [PruningStage(drop[:1], 4), PruningStage(drop, 8)]
    student, params = progressive_distill(make, TEACHER, teacher_params, stages, cfg, make_batches,
                                          str(tmp_path), config=config, progress=False)
    assert student.net.surgery.drop_blocks == drop
    assert "enc_8x8_block0" not in params["model"]  # identity shortcut: no parameters left
    for i, stage in enumerate(stages):
        assert os.listdir(tmp_path / f"stage{i}" / "checkpoints") == [str(stage.steps)]
    lines = [json.loads(l) for l in open(tmp_path / "stage1" / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [4, 8] and all(np.isfinite(l["loss"]) for l in lines)
    # distillation brought the student closer to the teacher than its surgery-only start
    loss = jax.jit(get_distill_loss_fn(student, TEACHER, teacher_params,
                                       config=config))
    start = init_student_params(student, teacher_params, dropped=drop)[0]
    evaluate = lambda p: np.mean([float(loss(p, next(make_batches(100 + i)), jax.random.key(i)))
                                  for i in range(4)])
    assert evaluate(params) < 0.9 * evaluate(start)
    with pytest.raises(ValueError, match="must keep dropping"):
        progressive_distill(make, TEACHER, teacher_params, [PruningStage(drop, 1),
                                                           PruningStage(drop[:1], 1)],
                            cfg, make_batches, str(tmp_path / "bad"),
                            config=config, progress=False)
