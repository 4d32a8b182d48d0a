"""Training: EDM loss, optimiser/EMA, 1 vs 4 devices, checkpoints, the loop and SIGKILL resume.

A tiny stand-in denoiser (tests/train_tiny.py) replaces difflax.models.Denoiser.
"""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_tiny
from difflax import data
from difflax.images import make_grid, save_grid
from difflax.mesh import make_mesh, replicated, shard_batch
from difflax.training import checkpoint as ckpt
from difflax.training import parallel
from difflax.training.losses import edm_loss, get_edm_loss_fn
from difflax.training.loop import get_init_params_fn
from difflax.training.state import (TrainConfig, ema_decay, learning_rate_schedule,
                                    make_optimizer)

HERE = os.path.dirname(os.path.abspath(__file__))


def assert_trees_close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol),
                 a, b)


# ---------------------------------------------------------------------------- loss


def test_edm_loss_perfect_denoiser_is_zero():
    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 1))
    assert float(edm_loss(lambda xn, s, c: x, x, key=jax.random.key(1))) == 0.0


def test_edm_loss_sigma_distribution_and_weighting():
    """Identity denoiser: error = noise, so E[loss] = E[(sigma^2 + sd^2) / sd^2]
    = exp(2 P_mean + 2 P_std^2) / sd^2 + 1 for ln sigma ~ N(P_mean, P_std^2)."""
    seen = {}

    def identity(xn, sigma, c):
        seen["sigma"] = sigma
        return xn

    x = jnp.zeros((200_000, 1))
    loss = edm_loss(identity, x, key=jax.random.key(0))
    log_sigma = np.log(np.asarray(seen["sigma"]))
    np.testing.assert_allclose([log_sigma.mean(), log_sigma.std()], [-1.2, 1.2], atol=0.02)
    expected = np.exp(2 * -1.2 + 2 * 1.2**2) / 0.5**2 + 1
    np.testing.assert_allclose(float(loss), expected, rtol=0.05)


# ---------------------------------------------------------------------------- state


def test_learning_rate_warmup_and_ema_decay():
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, batch_size=100, ema_halflife_kimg=1.0)
    lr = learning_rate_schedule(cfg)
    np.testing.assert_allclose([float(lr(i)) for i in (0, 2, 4, 100)], [0, 5e-4, 1e-3, 1e-3])
    assert float(learning_rate_schedule(TrainConfig(lr=2.0, warmup_steps=0))(0)) == 2.0
    # EDM half-life: decay^(1000 / 100 steps) = 1/2 once the ramp-up is over.
    np.testing.assert_allclose(float(ema_decay(cfg, 10_000)) ** 10, 0.5, rtol=1e-5)
    assert float(ema_decay(cfg, 0)) == 0.0  # ramp-up: the EMA starts at the parameters
    assert float(ema_decay(TrainConfig(ema_decay=0.99), 0)) == pytest.approx(0.99)


# ---------------------------------------------------------------------------- parallel


def _run_steps(state, mesh, cfg, model, n_steps):
    tx = make_optimizer(cfg)
    step = parallel.get_train_step_fn(get_edm_loss_fn(model), tx,
                                      lambda s: ema_decay(cfg, s), mesh)
    batches = data.batch_iterator("digits", cfg.batch_size, resolution=8)
    for _ in range(n_steps):
        state, metrics = step(state, shard_batch(next(batches), mesh),
                              jax.random.key(5))
    return state, metrics


def test_one_and_four_devices_agree():
    """Same seed, same batches: 1 and 4 devices give the same parameters (SPMD, fold_in)."""
    assert len(jax.devices()) >= 4, "conftest forces 4 host devices"
    cfg = TrainConfig(batch_size=8, lr=1e-2, warmup_steps=2, ema_decay=0.9)
    model = train_tiny.TinyDenoiser()
    mesh1, mesh4 = (make_mesh(jax.devices()[:n]) for n in (1, 4))
    init = get_init_params_fn(model, jax.random.key(0))
    state1 = parallel.init_train_state(init, make_optimizer(cfg), mesh1)
    state4 = jax.device_put(jax.device_get(state1), replicated(mesh4))
    one, m1 = _run_steps(state1, mesh1, cfg, model, 3)
    four, m4 = _run_steps(state4, mesh4, cfg, model, 3)
    assert int(four.step) == 3 and len(four.params["Conv_0"]["kernel"].sharding.device_set) == 4
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-5)
    assert_trees_close(one.params, four.params, rtol=1e-4, atol=1e-6)
    assert_trees_close(one.ema_params, four.ema_params, rtol=1e-4, atol=1e-6)


def test_shard_batch_checks_divisibility():
    mesh = make_mesh(jax.devices()[:4])
    x = shard_batch((np.zeros((8, 2)), np.zeros(8, np.int32)), mesh)
    assert x[0].shape == (8, 2) and x[0].addressable_shards[0].data.shape == (2, 2)
    with pytest.raises(ValueError, match="divisible"):
        shard_batch(np.zeros((6, 2)), mesh)


# ---------------------------------------------------------------------------- checkpoints


def _small_state(mesh, width=3, fill=0.0):
    tx = make_optimizer(TrainConfig())
    init = lambda: {"Dense_0": {"kernel": jnp.full((2, width), fill), "bias": jnp.zeros(width)}}
    return (parallel.init_train_state(init, tx, mesh),
            parallel.abstract_train_state(init, tx, mesh))


def _save_steps(directory, mesh, steps, keep=2):
    manager = ckpt.make_checkpoint_manager(directory, keep=keep, async_save=False)
    for s in steps:
        state, abstract = _small_state(mesh, fill=float(s))
        ckpt.save_checkpoint(manager, state.replace(step=jnp.asarray(s, jnp.int32)))
    manager.wait_until_finished()
    return manager, abstract


def test_checkpoint_keep_last_and_restore(tmp_path):
    mesh = make_mesh()
    manager, abstract = _save_steps(tmp_path / "ck", mesh, [1, 2, 3, 4])
    assert manager.all_steps() == [3, 4]
    restored = ckpt.restore_checkpoint(manager, abstract)
    assert int(restored.step) == 4 and float(restored.params["Dense_0"]["kernel"][0, 0]) == 4.0
    assert restored.params["Dense_0"]["kernel"].sharding == replicated(mesh)
    empty = ckpt.make_checkpoint_manager(tmp_path / "empty")
    assert ckpt.restore_checkpoint(empty, abstract) is None


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    mesh = make_mesh()
    manager, abstract = _save_steps(tmp_path / "ck", mesh, [1, 2])
    for root, _, files in os.walk(tmp_path / "ck" / "2" / "default"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.warns(UserWarning, match="step 2 .* unreadable"):
        restored = ckpt.restore_checkpoint(manager, abstract)
    assert int(restored.step) == 1 and float(restored.params["Dense_0"]["kernel"][0, 0]) == 1.0
    assert (tmp_path / "ck" / "2.corrupt").is_dir() and manager.all_steps() == [1]


def test_other_architecture_is_one_clear_error(tmp_path):
    mesh = make_mesh()
    manager, _ = _save_steps(tmp_path / "ck", mesh, [1])
    _, wider = _small_state(mesh, width=5)
    with pytest.raises(ckpt.CheckpointMismatchError) as err:
        ckpt.restore_checkpoint(manager, wider)
    message = str(err.value)
    assert "\n" not in message and "another architecture" in message
    assert "params.Dense_0.bias has shape (3,) in the checkpoint but (5,) in the model" in message


def test_remat_blocks_give_the_same_gradients():
    """UNetConfig.remat: each block under jax.checkpoint (the loss's jaxpr has its remat
    primitive), the same parameters and EDM-loss gradients (dropout on) for both UNets."""
    import dataclasses

    from difflax.models import Denoiser, UNetConfig

    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    for model_type in ("SongUNet", "DhariwalUNet"):
        net = UNetConfig(model_type=model_type, img_resolution=8, in_channels=1, out_channels=1,
                         model_channels=8, channel_mult=(1, 2), num_blocks=1,
                         attn_resolutions=(4,), dropout=0.1)
        plain, remat = Denoiser(net=net), Denoiser(net=dataclasses.replace(net, remat=True))
        params = get_init_params_fn(plain, jax.random.key(0))()
        grads = [jax.grad(get_edm_loss_fn(d))(params, (x, None), jax.random.key(2))
                 for d in (plain, remat)]
        assert_trees_close(grads[1], grads[0], rtol=1e-6, atol=1e-9)
        jaxprs = [str(jax.make_jaxpr(get_edm_loss_fn(d))(params, (x, None), jax.random.key(2)))
                  for d in (plain, remat)]
        assert "remat" not in jaxprs[0] and jaxprs[1].count("remat") >= 4  # 4 blocks here


# ---------------------------------------------------------------------------- images


def test_save_grid(tmp_path):
    from PIL import Image

    images = np.linspace(-1, 1, 5 * 4 * 4 * 3).reshape(5, 4, 4, 3)
    grid = make_grid(images, nrow=3, padding=2)
    assert grid.shape == (2 * 6 + 2, 3 * 6 + 2, 3) and grid.dtype == np.uint8
    assert (grid[:, 6:8] == 0).all() and (grid[6:8] == 0).all()  # padding is black
    assert grid[2, 2, 0] == 0 and grid[-3, -3, 0] == 0  # first pixel -1, empty slot
    save_grid(str(tmp_path / "g" / "grid.png"), images[..., :1], nrow=3, scale=1)
    assert Image.open(tmp_path / "g" / "grid.png").size == (20, 14)
    save_grid(str(tmp_path / "g" / "big.png"), images[..., :1], nrow=3)  # 4x4 images: x16
    assert Image.open(tmp_path / "g" / "big.png").size == (20 * 16, 14 * 16)


# ---------------------------------------------------------------------------- loop


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    steps = 40
    reference = train_tiny.run(str(tmp_path / "ref"), steps)
    lines = [json.loads(l) for l in open(tmp_path / "ref" / "metrics.jsonl")]
    assert [l["step"] for l in lines] == list(range(5, steps + 1, 5))
    assert all(np.isfinite(l["loss"]) and l["steps_per_sec"] > 0 for l in lines)
    assert sorted(os.listdir(tmp_path / "ref" / "samples")) == ["0000020.png", "0000040.png"]

    workdir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train_tiny.py"), str(workdir),
                             str(steps), "0.15"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (workdir / "checkpoints" / "20").is_dir():
        assert proc.poll() is None and time.time() < deadline, "tiny run did not checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert saved[-1] < steps, "the run was not killed mid-run"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train_tiny.run(str(workdir), steps)
    assert not [w for w in caught if "checkpoint" in str(w.message)]
    assert not [d for d in os.listdir(workdir / "checkpoints") if "corrupt" in d]
    assert int(resumed.step) == steps
    assert_trees_close(resumed.params, reference.params, rtol=1e-5, atol=1e-7)
    assert_trees_close(resumed.ema_params, reference.ema_params, rtol=1e-5, atol=1e-7)
    assert_trees_close(resumed.opt_state, reference.opt_state, rtol=1e-5, atol=1e-7)
    logged = [json.loads(l)["step"] for l in open(workdir / "metrics.jsonl")]
    assert logged == list(range(5, steps + 1, 5))  # lines after the checkpoint were dropped

    # TensorBoard: the same losses as metrics.jsonl, the grids; on resume the killed run's
    # events after its last checkpoint are purged, as TensorBoard reads the files
    for run in ("ref", "killed"):
        scalars, images = tensorboard_events(tmp_path / run / "tensorboard")
        jsonl = {l["step"]: l["loss"] for l in map(json.loads, open(tmp_path / run / "metrics.jsonl"))}
        assert sorted(scalars["train/loss"]) == sorted(jsonl)
        np.testing.assert_allclose([scalars["train/loss"][k] for k in sorted(jsonl)],
                                   [jsonl[k] for k in sorted(jsonl)], rtol=1e-6)
        assert sorted(images["samples"]) == [20, 40]
    assert len(os.listdir(workdir / "tensorboard")) == 2  # the killed run's file and the resumed


def tensorboard_events(directory):
    """({tag: {step: value}}, {tag: {step: image bytes}}) of the event files in `directory`,
    read in order; a SessionLog START at step s drops the earlier files' events at steps >= s
    (TensorBoard's purge of a restarted run)."""
    from tensorboardX.proto import event_pb2

    scalars, images = {}, {}
    for name in sorted(os.listdir(directory)):
        data = open(os.path.join(directory, name), "rb").read()
        pos = 0
        while pos < len(data):  # TFRecords: length (8), its crc (4), data, its crc (4)
            n = int.from_bytes(data[pos:pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 16 + n
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                for table in (*scalars.values(), *images.values()):
                    for step in [k for k in table if k >= event.step]:
                        del table[step]
            for v in event.summary.value:
                if v.HasField("image"):
                    images.setdefault(v.tag, {})[event.step] = v.image.encoded_image_string
                else:
                    scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    return scalars, images
