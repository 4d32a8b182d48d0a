"""The one sampling factory (difflax.samplers.get_sample_fn) on a Gaussian mixture's exact
denoiser: sharded equals unsharded equals difflax.sample, a sweep is a vmap, names carry orders."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import data, sample, schedules
from difflax.mesh import make_mesh
from difflax.samplers import get_sample_fn, keyed_sample_fn, split_sampler_name

GM = data.gmm(dim=4, num_components=3, seed=1, spread=2.0)
SCHEDULE = schedules.edm()


def scaled_mixture(params, labels, skip_scales):
    """The mixture's exact x0-prediction times `skip_scales` (a scalar standing in for a
    network's skip scales; None = 1) plus params["shift"]."""
    scale = 1.0 if skip_scales is None else skip_scales

    def model_fn(x, t):
        sigma = jnp.broadcast_to(t, x.shape[:1])
        return scale * jax.vmap(GM.posterior_mean)(x, jnp.ones_like(sigma), sigma) + params["shift"]

    return model_fn


PARAMS = {"shift": jnp.float32(0.0)}
NOISE = np.asarray(jax.random.normal(jax.random.key(0), (6, 4)))
PURE, NFE = get_sample_fn(scaled_mixture, schedule=SCHEDULE, sampler="deis_tab3", steps=5,
                          prediction="x0")


def test_names_carry_their_order():
    assert split_sampler_name("deis_tab3") == ("deis_tab", {"order": 3})
    assert split_sampler_name("ipndm4", {"lower_order_final": True}) == (
        "ipndm", {"lower_order_final": True, "order": 4})
    assert split_sampler_name("edm_heun") == ("edm_heun", {})
    with pytest.raises(ValueError, match="names its order"):
        split_sampler_name("deis_tab3", {"order": 2})
    with pytest.raises(ValueError, match="choose one of"):
        get_sample_fn(scaled_mixture, schedule=SCHEDULE, sampler="deis_tab9x", steps=5)


def test_pure_sharded_and_sample_agree():
    """6 rows over a 4-device mesh (padded to 8) give difflax.sample's samples."""
    expected, nfe = sample(scaled_mixture(PARAMS, None, None), jnp.asarray(NOISE),
                           schedule=SCHEDULE, sampler="deis_tab", order=3, steps=5,
                           prediction="x0")
    assert nfe == NFE == 5
    np.testing.assert_array_equal(jax.jit(PURE)(PARAMS, NOISE), expected)
    sharded, _ = get_sample_fn(scaled_mixture, schedule=SCHEDULE, sampler="deis_tab3", steps=5,
                               prediction="x0", mesh=make_mesh(jax.devices()[:4]))
    out = sharded(PARAMS, NOISE, np.zeros(6, np.int32))
    assert out.shape == (6, 4)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert float(jnp.std(expected)) > 0.5  # the ODE went somewhere


def test_a_sweep_is_a_vmap_over_skip_scales():
    scales = jnp.asarray([1.0, 0.5, 0.0])
    sweep = jax.jit(jax.vmap(PURE, in_axes=(None, None, None, 0)))(PARAMS, NOISE, None, scales)
    for k, s in enumerate(scales):
        np.testing.assert_allclose(sweep[k], jax.jit(PURE)(PARAMS, NOISE, None, s), rtol=1e-6,
                                   atol=1e-6)
    # scale 0: the x0-prediction is 0, DEIS on EDM then shrinks x_T to x_min = sigma_min z
    np.testing.assert_allclose(sweep[2], SCHEDULE.sigma(SCHEDULE.t_min) * NOISE, rtol=1e-4)


def test_clip_and_keyed_noise():
    params = {"shift": jnp.float32(5.0)}  # far outside [-1, 1]
    clipped, _ = get_sample_fn(scaled_mixture, schedule=SCHEDULE, sampler="euler", steps=3,
                               prediction="x0", clip=True)
    plain, _ = get_sample_fn(scaled_mixture, schedule=SCHEDULE, sampler="euler", steps=3,
                             prediction="x0")
    np.testing.assert_array_equal(clipped(params, NOISE), jnp.clip(plain(params, NOISE), -1, 1))
    assert float(jnp.max(plain(params, NOISE))) > 2
    keyed = keyed_sample_fn(plain, (4,))
    key = jax.random.key(3)
    np.testing.assert_array_equal(keyed(params, key, np.zeros(6)),
                                  plain(params, jax.random.normal(key, (6, 4)), None))
