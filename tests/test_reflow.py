"""Reflow: the teacher on the rectified-flow path, pair generation (sharded, chunked, resumable
after SIGKILL), few-step samplers and straightness, and 2-rectified-flow training with the loop.

Run as a script (`python tests/test_reflow.py OUT_DIR DELAY`) it generates the test's pairs
slowly, so that the test can kill it mid-run.
"""
import json
import os
import signal
import subprocess
import sys
import time

if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from difflax import data, reference_sample, schedules
from difflax.rfpp import (TimeDistribution, generate_pairs, get_rectified_flow_loss_fn,
                          get_rectified_flow_sample_fn, load_pairs, pair_batches, rf_grid,
                          rf_schedule, straightness, velocity_from_denoiser)
from difflax.samplers import denoiser_model, get_sample_fn, solve
from difflax.samplers.flow import rf_euler, rf_renoise
from difflax.training import TrainConfig, make_mesh, train

GM = data.gmm(dim=4, num_components=3, seed=1, spread=2.0)
NUM_PAIRS, CHUNK = 40, 8


class ExactDenoiser:
    """The mixture's exact D(x; sigma) with a Flax-like apply (no parameters)."""

    def apply(self, variables, x, sigma, labels=None):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype).reshape(-1), x.shape[:1])
        return jax.vmap(GM.posterior_mean)(x, jnp.ones_like(sigma), sigma)


def teacher_sample_fn(mesh=None):
    fn, _ = get_sample_fn(denoiser_model(ExactDenoiser()), schedule=schedules.edm(),
                          sampler="deis_tab2", steps=6, prediction="x0", mesh=mesh or make_mesh())
    return fn


def make_pairs(out_dir, delay=0.0, mesh=None):
    fn = teacher_sample_fn(mesh)

    def slow(params, noise, labels):
        time.sleep(delay)
        return fn(params, noise, labels)

    return generate_pairs(slow if delay else fn, {}, out_dir, num_pairs=NUM_PAIRS,
                          chunk_size=CHUNK, shape=(4,), num_classes=3, seed=7,
                          info={"teacher": "gmm"}, progress=False)


# ---------------------------------------------------------------------------- teacher re-expression


def test_reexpressed_velocity_lands_where_the_teacher_ode_lands():
    """Tsit5 on the teacher's EDM PF-ODE from sigma = 80 to 0.002 and on the re-expressed
    velocity from t = 80/81 to 0.002/1.002 (same noise, x_t = (1 - t) x_sigma) agree."""
    z = jax.random.normal(jax.random.key(0), (16, 4))
    D = lambda x, sigma: ExactDenoiser().apply({}, x, sigma)
    x_edm, _ = reference_sample(D, z, schedule=schedules.edm(0.002, 80.0), prediction="x0",
                                rtol=1e-7, atol=1e-7)
    v = velocity_from_denoiser(lambda x, s, c: D(x, s))
    t_hi, t_lo = 80 / 81, 0.002 / 1.002
    # x_T = sigma_RF(t_hi) z = (80/81) z = (1 - t_hi) * 80 z: the teacher's start point
    x_rf, _ = reference_sample(lambda x, t: v(x, t), z, schedule=schedules.rectified_flow(),
                               prediction="velocity", t_max=t_hi, t_min=t_lo, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(x_rf / (1 - t_lo), x_edm, atol=2e-4)
    assert float(jnp.std(x_edm)) > 1.0  # the ODE moved somewhere non-trivial


# ------------------------------------------------------------------------ samplers, straightness


def test_renoise_sampler_and_straightness():
    fn = denoiser_model(ExactDenoiser(), rectified_flow=True)({}, None, None)
    z = jax.random.normal(jax.random.key(1), (64, 4))
    s = rf_schedule()
    run = lambda factory, steps: solve(fn, z, schedule=s, solver=factory(s, rf_grid(steps))[0],
                                       grid=rf_grid(steps), prediction="x0")
    x0_hat = fn(z * rf_grid(1)[0], jnp.full((64,), rf_grid(1)[0]))
    np.testing.assert_allclose(run(rf_renoise, 1), x0_hat, atol=1e-5)  # one step: x_hat
    # from t = 1 - 1e-5 the model's noise estimate is the initial noise, so 2 steps agree with
    # Euler as well; from 3 steps on the re-noised states differ
    np.testing.assert_allclose(run(rf_renoise, 2), run(rf_euler, 2), atol=1e-4)
    assert float(jnp.max(jnp.abs(run(rf_renoise, 3) - run(rf_euler, 3)))) > 1e-2
    assert rf_renoise(s, rf_grid(3))[1] == 3
    # a straight flow (x0-prediction constant c: x_t = (1 - t) c + t z) has straightness 0,
    # the mixture's curved flow does not
    c = jnp.ones((4,))
    flat = straightness(lambda x, t: jnp.broadcast_to(c, x.shape), z, schedule=s, grid=rf_grid(8),
                        prediction="x0")
    curved = straightness(fn, z, schedule=s, grid=rf_grid(8), prediction="x0")
    assert flat.shape == (64,) and float(jnp.max(flat)) < 1e-8
    assert float(jnp.mean(curved)) > 1e-2


# ---------------------------------------------------------------------------- pairs on disk


def test_pairs_are_teacher_samples_and_device_count_does_not_matter(tmp_path):
    make_pairs(str(tmp_path / "four"))
    make_pairs(str(tmp_path / "one"), mesh=make_mesh(jax.devices()[:1]))
    four, one = load_pairs(str(tmp_path / "four")), load_pairs(str(tmp_path / "one"))
    assert four["samples"].shape == (NUM_PAIRS, 4) and set(np.unique(four["labels"])) <= {0, 1, 2}
    np.testing.assert_allclose(four["samples"], one["samples"], atol=1e-6)
    np.testing.assert_array_equal(four["noise"], one["noise"])
    # each sample is the teacher's ODE solution from sigma_max * its own noise
    again = teacher_sample_fn()({}, jnp.asarray(four["noise"][:8]), jnp.zeros(8, int))
    np.testing.assert_allclose(four["samples"][:8], again, atol=1e-6)
    assert float(np.std(four["samples"])) > 1.0
    with pytest_raises(ValueError, "other pairs"):
        generate_pairs(teacher_sample_fn(), {}, str(tmp_path / "four"), num_pairs=8,
                       chunk_size=CHUNK, shape=(4,))


def test_pairs_clipped_as_rfpp_stores_them(tmp_path):
    fn = teacher_sample_fn()
    generate_pairs(fn, {}, str(tmp_path / "clip"), num_pairs=8, chunk_size=8, shape=(4,),
                   progress=False, clip=True)
    pairs = load_pairs(str(tmp_path / "clip"))
    raw = np.asarray(fn({}, jnp.asarray(pairs["noise"]), jnp.zeros(8, int)))
    assert np.abs(raw).max() > 1.0  # the mixture's samples leave [-1, 1]: clipping is real
    np.testing.assert_allclose(pairs["samples"], np.clip(raw, -1.0, 1.0), atol=1e-6)
    with open(tmp_path / "clip" / "pairs.json") as f:
        assert json.load(f)["clip"] is True


def test_custom_t_steps_grid_as_rfpp():
    np.testing.assert_array_equal(rf_grid(t_steps=(1.0, 0.75, 0.5, 0.25)),
                                  [1 - 1e-5, 0.75, 0.5, 0.25, 0.0])
    np.testing.assert_array_equal(rf_grid(t_steps=[0.9]), [1 - 1e-5, 0.0])
    with pytest_raises(ValueError, "decreasing times"):
        rf_grid(t_steps=(1.0, 0.5, 0.75))
    with pytest_raises(ValueError, "not both"):
        rf_grid(2, t_steps=(1.0, 0.5))
    # Euler on it by hand: v = (x - x_hat) / t, x_{i+1} = x_i + (t_{i+1} - t_i) v
    model_fn = denoiser_model(ExactDenoiser(), rectified_flow=True)({}, None, None)
    z = jax.random.normal(jax.random.key(5), (8, 4))
    grid = rf_grid(t_steps=(1.0, 0.6, 0.2))
    x = grid[0] * z
    for t0, t1 in zip(grid[:-1], grid[1:]):
        v = (x - model_fn(x, jnp.full((8,), t0))) / t0
        x = x + (t1 - t0) * v
    fn, nfe = get_rectified_flow_sample_fn(ExactDenoiser(), sampler="rf_euler", t_steps=(1.0, 0.6, 0.2))
    assert nfe == 3
    np.testing.assert_allclose(fn({}, z, jnp.zeros(8, int)), x, atol=1e-5)


def pytest_raises(error, match):
    import pytest
    return pytest.raises(error, match=match)


def test_sigkill_during_pair_generation_and_resume(tmp_path):
    make_pairs(str(tmp_path / "ref"))
    out = tmp_path / "killed"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(out), "1.0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (out / "chunk_00001.npz").exists():
        assert proc.poll() is None and time.time() < deadline, "pair generation did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p for p in os.listdir(out) if p.startswith("chunk_") and "tmp" not in p)
    assert len(done) < NUM_PAIRS // CHUNK, "the run was not killed mid-run"
    with pytest_raises(FileNotFoundError, "run generate_pairs again"):
        load_pairs(str(out))
    make_pairs(str(out))
    ref, resumed = load_pairs(str(tmp_path / "ref")), load_pairs(str(out))
    for k in ref:
        np.testing.assert_allclose(resumed[k], ref[k], atol=1e-6)
    assert not [p for p in os.listdir(out) if "tmp" in p]


# ---------------------------------------------------------------------------- 2-rectified flow


class TinyDenoiser(nn.Module):
    """EDM-preconditioned MLP on vectors: D = c_skip x + c_out F(c_in x, ln(sigma) / 4)."""

    input_shape: tuple[int, ...] = (4,)  # unconditional, on vectors of 4
    label_dim: int = 0

    @nn.compact
    def __call__(self, x, sigma, class_labels=None, train=False):
        s = jnp.broadcast_to(jnp.asarray(sigma).reshape(-1), x.shape[:1])[:, None]
        h = jnp.concatenate([x / jnp.sqrt(s**2 + 0.25), jnp.log(s) / 4], axis=-1)
        h = nn.Dense(x.shape[-1])(nn.silu(nn.Dense(32)(h)))
        return 0.25 / (s**2 + 0.25) * x + 0.5 * s / jnp.sqrt(s**2 + 0.25) * h


def test_two_rectified_flow_trains_from_the_teacher_with_the_loop(tmp_path):
    model = TinyDenoiser()
    teacher = model.init(jax.random.key(0), jnp.zeros((1, 4)), jnp.ones(1))["params"]
    fn, _ = get_sample_fn(denoiser_model(model), schedule=schedules.edm(), sampler="euler",
                          steps=8, prediction="x0", mesh=make_mesh())
    generate_pairs(fn, teacher, str(tmp_path / "pairs"), num_pairs=64, chunk_size=32,
                   shape=(4,), progress=False)
    pairs = load_pairs(str(tmp_path / "pairs"))
    cfg = TrainConfig(steps=40, batch_size=16, lr=1e-2, warmup_steps=1, log_every=1,
                      ckpt_every=40, ema_decay=0.9, seed=3)
    loss_fn = get_rectified_flow_loss_fn(model, time_dist=TimeDistribution("u_shaped"),
                                         premetric="pseudo_huber")
    state = train(cfg, model, lambda start: pair_batches(pairs, 16, seed=1, start_step=start),
                  str(tmp_path / "rf"), get_loss_fn=lambda m: loss_fn,
                  init_params_fn=lambda: teacher, progress=False)
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "rf" / "metrics.jsonl")]
    # step 1's loss is the teacher's own: the 2-RF starts at the teacher's ODE
    x, z, labels = next(pair_batches(pairs, 16, seed=1))
    k_train = jax.random.split(jax.random.key(cfg.seed))[1]
    first = loss_fn(teacher, (x, z, labels), jax.random.fold_in(k_train, 0))
    np.testing.assert_allclose(losses[0], float(first), rtol=1e-5)
    assert int(state.step) == 40
    # on all pairs, averaged over many time draws, the trained flow fits them better
    assert "labels" not in pairs and labels is None  # an unconditional teacher's pairs
    everything = (pairs["samples"], pairs["noise"], None)
    mean_loss = lambda p: np.mean([float(loss_fn(p, everything, jax.random.key(k)))
                                   for k in range(8)])
    assert mean_loss(state.params) < 0.85 * mean_loss(teacher)


if __name__ == "__main__":
    make_pairs(sys.argv[1], float(sys.argv[2]))
