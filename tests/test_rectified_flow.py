"""Rectified-flow training (rfpp): time densities, inverse-CDF sampling, premetrics, the loss,
the teacher re-expression, few-step samplers and straightness."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from difflax.rfpp import (TimeDistribution, get_rectified_flow_loss_fn, huber_constant,
                          linear_path, pseudo_huber, rectified_flow_loss, rms_l2, squared_l2,
                          velocity_from_denoiser)

DISTS = [TimeDistribution("uniform"), TimeDistribution("u_shaped", a=4.0),
         TimeDistribution("u_shaped", a=1.5), TimeDistribution("logit_normal", mean=-0.5, std=1.2)]


# ---------------------------------------------------------------------------- time densities


@pytest.mark.parametrize("dist", DISTS, ids=lambda d: f"{d.kind}")
def test_density_integrates_to_one_and_matches_cdf(dist):
    t = np.linspace(0.0, 1.0, 400_001)
    p = np.asarray(dist.pdf(jnp.asarray(t)), np.float64)
    assert abs(np.trapezoid(p, t) - 1.0) < 1e-3
    # the CDF is the integral of the density
    cum = np.concatenate([[0.0], np.cumsum((p[1:] + p[:-1]) / 2 * np.diff(t))])
    np.testing.assert_allclose(np.asarray(dist.cdf(jnp.asarray(t[::4000]))), cum[::4000],
                               atol=2e-3)


@pytest.mark.parametrize("dist", DISTS, ids=lambda d: f"{d.kind}")
def test_inverse_cdf_samples_follow_the_density(dist):
    t = np.asarray(dist.sample(jax.random.key(0), (20_000,)), np.float64)
    assert dist.t_min <= t.min() and t.max() <= dist.t_max
    p = stats.kstest(t, lambda s: np.asarray(dist.cdf(jnp.asarray(s)), np.float64)).pvalue
    assert p > 1e-3, p
    if dist.kind == "u_shaped":  # U-shaped: mass piles up at both ends, symmetric
        assert np.mean(t < 0.1) > 0.105 and abs(np.mean(t < 0.5) - 0.5) < 0.02


def test_u_shaped_density_is_rfpp_exponential_mixture():
    """rfpp's t_dist.py: half of the draws from a e^(a t) / (e^a - 1), half mirrored."""
    a = 4.0
    dist = TimeDistribution("u_shaped", a=a, t_min=0.0, t_max=1.0)
    t = np.linspace(0.01, 0.99, 50)
    mixture = 0.5 * a * (np.exp(a * t) + np.exp(a * (1 - t))) / (np.exp(a) - 1)
    np.testing.assert_allclose(np.asarray(dist.pdf(jnp.asarray(t))), mixture, rtol=1e-5)


def test_unknown_distribution_is_an_error():
    with pytest.raises(ValueError, match="u_shaped"):
        TimeDistribution("cosh")


# ---------------------------------------------------------------------------- premetrics / loss


def test_premetrics_against_hand_computed_values():
    pred = np.array([[[[1.0], [2.0]], [[0.0], [-1.0]]]], np.float32)   # (1, 2, 2, 1), d = 4
    target = np.zeros_like(pred)
    np.testing.assert_allclose(squared_l2(pred, target), [6.0 / 4], rtol=1e-6)
    np.testing.assert_allclose(rms_l2(pred, target), [math.sqrt(6.0 / 4)], rtol=1e-6)
    assert huber_constant(4, "d") == pytest.approx(0.00216)
    assert huber_constant(4, "sqrt_d") == pytest.approx(0.00108)
    c = 0.00216
    np.testing.assert_allclose(pseudo_huber(pred, target), [(math.sqrt(6 + c**2) - c) / 4],
                               rtol=1e-6)
    np.testing.assert_allclose(pseudo_huber(pred, target, 3.0), [(math.sqrt(15) - 3) / 4],
                               rtol=1e-6)


def test_rectified_flow_loss_hand_computed():
    x = jnp.array([[1.0, -1.0], [0.5, 0.0]])
    z = jnp.array([[0.0, 2.0], [-1.0, 1.0]])
    t = jnp.array([0.25, 0.5])
    x_t, target = linear_path(x, z, t)
    np.testing.assert_allclose(x_t, [[0.75, -0.25], [-0.25, 0.5]])
    np.testing.assert_array_equal(target, z - x)
    # a velocity model v(x_t, t) = 2 x_t: errors against z - x = [[-1, 3], [-1.5, 1]]
    v = lambda x_t, t, c: 2 * x_t
    err = np.array([[1.5 + 1, -0.5 - 3], [-0.5 + 1.5, 1.0 - 1]])
    # rfpp's "l2": the RMS of each example's errors; "l2-squared": their mean square
    want_l2 = np.mean(np.sqrt(np.mean(err**2, axis=1)))  # (sqrt(9.25) + sqrt(0.5)) / 2
    np.testing.assert_allclose(rectified_flow_loss(v, x, z, t, premetric="l2"), want_l2, rtol=1e-6)
    np.testing.assert_allclose(want_l2, (math.sqrt(9.25) + math.sqrt(0.5)) / 2)
    want_sq = np.mean(np.mean(err**2, axis=1))
    np.testing.assert_allclose(rectified_flow_loss(v, x, z, t, premetric="l2_squared"), want_sq,
                               rtol=1e-6)
    c = 0.00054 * 2
    want_h = np.mean((np.sqrt(np.sum(err**2, 1) + c**2) - c) / 2)
    np.testing.assert_allclose(rectified_flow_loss(v, x, z, t, premetric="pseudo_huber"), want_h,
                               rtol=1e-6)
    # LPIPS-Huber: (1 - t) Huber(v, z - x) + LPIPS(x_t - t v, x), with a stand-in "LPIPS"
    fake_lpips = lambda a, b: jnp.sum(jnp.abs(a - b), axis=1)
    x_t = np.asarray(x_t)
    x_hat = x_t - np.asarray(t)[:, None] * 2 * x_t
    perc = np.sum(np.abs(x_hat - np.asarray(x)), 1)
    hub = (np.sqrt(np.sum(err**2, 1) + c**2) - c) / 2
    np.testing.assert_allclose(
        rectified_flow_loss(v, x, z, t, premetric="lpips_huber", lpips_fn=fake_lpips),
        np.mean((1 - np.asarray(t)) * hub + perc), rtol=1e-6)
    np.testing.assert_allclose(
        rectified_flow_loss(v, x, z, t, premetric="lpips", lpips_fn=fake_lpips, lpips_div_t=True),
        np.mean(perc / np.asarray(t)), rtol=1e-6)
    with pytest.raises(ValueError, match="lpips_fn"):
        rectified_flow_loss(v, x, z, t, premetric="lpips")


# ------------------------------------------------------------------------ teacher on the RF path


def _mixture():
    from difflax import data
    return data.gmm(dim=4, num_components=3, seed=1, spread=2.0)


def test_denoiser_velocity_is_the_exact_rectified_flow_velocity():
    """For a Gaussian mixture, the exact EDM denoiser re-expressed on the RF path equals the
    analytic marginal velocity E[z - x | x_t] = (x_t - E[x | x_t]) / t of the linear path."""
    gm = _mixture()
    denoise = lambda x, sigma, c: jax.vmap(gm.posterior_mean)(x, jnp.ones_like(sigma), sigma)
    v = velocity_from_denoiser(denoise)
    key = jax.random.key(0)
    x = gm.sample(key, 64)
    z = jax.random.normal(jax.random.fold_in(key, 1), x.shape)
    t = jax.random.uniform(jax.random.fold_in(key, 2), (64,), minval=0.05, maxval=0.95)
    x_t = linear_path(x, z, t)[0]
    # E[x | x_t] on the RF path directly (alpha = 1 - t, sigma = t): no EDM variables at all
    x0 = jax.vmap(gm.posterior_mean)(x_t, 1 - t, t)
    np.testing.assert_allclose(v(x_t, t, None), (x_t - x0) / t[:, None], rtol=2e-4, atol=2e-4)
    # the exact field's mean-square loss is the conditional variance, well below the zero model's
    loss_exact = rectified_flow_loss(v, x, z, t, premetric="l2_squared")
    loss_zero = rectified_flow_loss(lambda a, b, c: jnp.zeros_like(a), x, z, t,
                                    premetric="l2_squared")
    assert float(loss_exact) < 0.5 * float(loss_zero)


def test_loss_fn_for_the_loop_uses_pairs_or_draws_noise():
    import flax.linen as nn

    class Tiny(nn.Module):  # an EDM-style denoiser: D(x; sigma) = c_skip x + c_out F
        input_shape: tuple = (3,)  # unconditional, on vectors of 3
        label_dim: int = 0

        @nn.compact
        def __call__(self, x, sigma, labels=None, train=False):
            s = sigma[:, None]
            return x / (1 + s**2) + s / jnp.sqrt(1 + s**2) * nn.Dense(x.shape[-1])(x)

    model = Tiny()
    params = model.init(jax.random.key(0), jnp.zeros((1, 3)), jnp.ones(1))["params"]
    x = jax.random.normal(jax.random.key(1), (8, 3))
    z = jax.random.normal(jax.random.key(2), (8, 3))
    labels = None
    loss_fn = get_rectified_flow_loss_fn(model, premetric="pseudo_huber")
    key = jax.random.key(3)
    paired = loss_fn(params, (x, z, labels), key)
    # the same as the loss computed by hand with the same t draw
    t = TimeDistribution().sample(jax.random.split(key, 3)[0], (8,))
    v = velocity_from_denoiser(lambda a, s, c: model.apply({"params": params}, a, s))
    np.testing.assert_allclose(paired, rectified_flow_loss(v, x, z, t, premetric="pseudo_huber"),
                               rtol=1e-5)
    drawn = loss_fn(params, (x, labels), key)
    assert np.isfinite(float(drawn)) and float(drawn) != float(paired)


def test_loss_fns_refuse_data_that_does_not_fit_the_model():
    """Labels for an unconditional model, none for a conditional one, or another example
    shape: a ValueError at trace time, before anything is computed."""
    from difflax.training import get_distill_loss_fn, get_edm_loss_fn, model_signature
    from difflax.models import Denoiser, ddpmpp

    cond = Denoiser(net=ddpmpp(img_resolution=8, in_channels=1, out_channels=1, label_dim=10,
                               model_channels=8, channel_mult=(1,), num_blocks=1,
                               attn_resolutions=()))
    uncond = Denoiser(net=dataclasses.replace(cond.net, label_dim=0))
    assert model_signature(cond) == ((8, 8, 1), 10) and model_signature(uncond) == ((8, 8, 1), 0)
    x, labels = jnp.zeros((2, 8, 8, 1)), jnp.zeros(2, int)
    key = jax.random.key(0)
    factories = [get_edm_loss_fn, get_rectified_flow_loss_fn,
                 lambda m: get_distill_loss_fn(m, m, None)]
    for make in factories:
        with pytest.raises(ValueError, match="conditional on 10 classes but the batch has no labels"):
            jax.eval_shape(make(cond), None, (x, None), key)
        with pytest.raises(ValueError, match="unconditional .* but the batch has labels"):
            jax.eval_shape(make(uncond), None, (x, labels), key)
        with pytest.raises(ValueError, match=r"shape \(16, 16, 1\) but the model takes \(8, 8, 1\)"):
            jax.eval_shape(make(cond), None, (jnp.zeros((2, 16, 16, 1)), labels), key)
    with pytest.raises(ValueError, match="declares no input_shape and label_dim"):
        model_signature(object())
