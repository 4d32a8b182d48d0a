"""Adjacent-step feature similarity (Faster Diffusion Fig. 2 analogue) on a tiny UNet."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import schedules
from difflax.accel import adjacent_step_similarity, denoiser_run_fn
from difflax.models import Denoiser, ddpmpp, feature_nodes
from difflax.samplers import make_grid
from difflax.samplers.flow import euler_trajectory

NET = ddpmpp(img_resolution=8, in_channels=1, out_channels=1, label_dim=0, model_channels=8,
             channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)


@pytest.fixture(scope="module")
def run_fn():
    denoiser = Denoiser(net=NET)
    x = jnp.zeros((2, 8, 8, 1))
    shapes = jax.eval_shape(denoiser.init, jax.random.key(1), x, jnp.ones(2))
    rng = np.random.default_rng(0)  # random weights: EDM's zero-initialised layers hide bugs
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, s.dtype), shapes)
    return denoiser, variables, denoiser_run_fn(denoiser, variables)


def test_constant_trajectory_is_perfectly_similar(run_fn):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    out = adjacent_step_similarity(run_fn[2], NET, jnp.stack([x] * 3), jnp.full(3, 1.5))
    nodes = [n for n in feature_nodes(NET) if n.kind != "output"]
    assert out.names == tuple(n.name for n in nodes)
    assert out.cosine.shape == out.relative_change.shape == (2, len(nodes))
    np.testing.assert_allclose(out.cosine, 1.0, atol=1e-5)
    np.testing.assert_allclose(out.relative_change, 0.0, atol=1e-6)


def test_matches_direct_computation_on_a_ddim_trajectory(run_fn):
    denoiser, variables, run = run_fn
    schedule = schedules.edm(0.002, 80.0)
    grid = make_grid(schedule, "ddim", 4)
    noise = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
    traj = euler_trajectory(lambda x, t: denoiser.apply(variables, x, t), noise,
                            schedule=schedule, grid=grid, prediction="x0")
    states, times = traj[:-1], np.asarray(grid[:-1], np.float32)
    out = adjacent_step_similarity(run, NET, states, times)
    # reference: numpy on features stored by separate calls
    names = out.names
    stored = jax.jit(lambda x, t: run(x, jnp.full(2, t), store=names, output=False)[1])
    feats = [stored(states[i], times[i]) for i in range(4)]
    for i in range(3):
        for j, name in enumerate(names):
            a, b = (np.concatenate([np.asarray(v, np.float64).reshape(2, -1)
                                    for v in jax.tree.leaves(f[name])], 1)
                    for f in (feats[i], feats[i + 1]))
            cos = np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
            change = np.mean(np.linalg.norm(b - a, axis=1) / np.linalg.norm(a, axis=1))
            assert out.cosine[i, j] == pytest.approx(cos, abs=1e-5)
            assert out.relative_change[i, j] == pytest.approx(change, rel=1e-4, abs=1e-6)
    assert np.all(out.relative_change > 1e-4)  # the states differ, so do their features
    enc = [j for j, k in enumerate(out.kinds) if k == "encoder"]
    np.testing.assert_allclose(out.mean("encoder"), out.cosine[:, enc].mean(1))
    with pytest.raises(ValueError, match="valid choices"):
        out.mean("bottleneck")
