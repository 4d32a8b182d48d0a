"""Skip-Tuning (Ma et al. 2024): schedules, sweeps by vmap, search, the loss analysis."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import sample, schedules
from difflax.accel import (denoising_loss_by_sigma, evaluate_settings, get_sweep_fn,
                           linear_skip_scales, per_resolution_skip_scales, per_skip_scales,
                           search, stack_skip_scales, time_dependent_skip_scales)
from difflax.metrics import FrechetMetric, mean_cov
from difflax.models import Denoiser, ddpmpp, skip_connections

NET = ddpmpp(img_resolution=8, in_channels=1, out_channels=1, label_dim=3, model_channels=8,
             channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0)
# skips: 8x8_conv (8 ch), 8x8_block0 (8), 4x4_down (8), 4x4_block0 (16)


@pytest.fixture(scope="module")
def tiny():
    den = Denoiser(net=NET)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    labels = jnp.array([0, 1, 2, 0])
    shapes = jax.eval_shape(den.init, jax.random.key(1), x, jnp.ones(4), labels)
    rng = np.random.default_rng(0)  # random weights: EDM's zero-init output layers hide bugs
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, s.dtype), shapes)
    return den, variables, x, labels


def test_schedules_follow_the_paper_convention():
    assert [s.name for s in skip_connections(NET)] == ["8x8_conv", "8x8_block0", "4x4_down",
                                                       "4x4_block0"]
    lin = linear_skip_scales(NET, 1.0, 0.7)  # index 0 = top (full resolution), last = bottom
    np.testing.assert_allclose(lin, [1.0, 0.9, 0.8, 0.7], rtol=1e-6)
    np.testing.assert_allclose(per_resolution_skip_scales(NET, {4: 0.5}), [1, 1, 0.5, 0.5])
    np.testing.assert_allclose(per_skip_scales(NET, [1, 2, 3, 4]), [1, 2, 3, 4])
    np.testing.assert_allclose(per_skip_scales(NET, {"4x4_down": 0.3}), [1, 1, 0.3, 1])
    chan = per_skip_scales(NET, [1.0, 1.0, 1.0, jnp.linspace(0.5, 1.0, 16)])
    assert isinstance(chan, tuple) and chan[3].shape == (16,)
    stacked = stack_skip_scales([chan, chan])
    assert stacked[0].shape == (2,) and stacked[3].shape == (2, 16)
    with pytest.raises(ValueError, match="resolutions"):
        per_resolution_skip_scales(NET, {16: 0.9})
    with pytest.raises(ValueError, match="16 channels"):
        per_skip_scales(NET, [1.0, 1.0, 1.0, jnp.ones(8)])
    with pytest.raises(ValueError, match="unknown skips"):
        per_skip_scales(NET, {"middle": 0.5})


def test_all_ones_reproduce_the_plain_model_exactly(tiny):
    den, variables, x, labels = tiny
    apply = jax.jit(lambda s: den.apply(variables, x, jnp.full(4, 0.7), labels, skip_scales=s))
    plain = apply(None)
    np.testing.assert_array_equal(apply(linear_skip_scales(NET, 1.0, 1.0)), plain)
    np.testing.assert_array_equal(apply(per_resolution_skip_scales(NET, {})), plain)
    assert float(jnp.abs(apply(linear_skip_scales(NET, 1.0, 0.7)) - plain).max()) > 1e-3


def test_vmapped_sweep_equals_one_at_a_time(tiny):
    den, variables, _, labels = tiny
    settings = [linear_skip_scales(NET, 1.0, r) for r in (1.0, 0.8, 1.1)]
    sweep, nfe = get_sweep_fn(den, sampler="deis_tab", steps=3, order=2)
    assert nfe == 3
    key = jax.random.key(2)
    out = sweep(variables, stack_skip_scales(settings), key, labels)
    assert out.shape == (3, 4, 8, 8, 1)
    noise = jax.random.normal(key, (4, 8, 8, 1))
    for i, s in enumerate(settings):
        model_fn = lambda x, t, s=s: den.apply(variables, x, t, labels, skip_scales=s)
        one = jnp.clip(jax.jit(lambda n: sample(model_fn, n, schedule=schedules.edm(0.002, 80.0),
                                                sampler="deis_tab", steps=3, order=2,
                                                prediction="x0")[0])(noise), -1, 1)
        np.testing.assert_allclose(out[i], one, atol=1e-5)
    assert float(jnp.abs(out[1] - out[0]).max()) > 1e-3


def test_time_dependent_scales_by_hand():
    s = jnp.array([1.0, 0.9, 0.8, 0.7])
    at = lambda sigma, profile="constant": np.asarray(time_dependent_skip_scales(
        s, sigma, window=(1.0, 5.0), profile=profile))
    np.testing.assert_array_equal(at(0.5), [1, 1, 1, 1])  # outside the window: plain
    np.testing.assert_array_equal(at(6.0, "decreasing"), [1, 1, 1, 1])
    np.testing.assert_array_equal(at(3.0), s)  # inside: the setting itself, exactly
    # sigma = 2: decreasing w = (5 - 2) / 4 = 0.75, increasing w = 0.25; rho -> 1 - w (1 - rho)
    np.testing.assert_allclose(at(2.0, "decreasing"), [1, 0.925, 0.85, 0.775], rtol=1e-6)
    np.testing.assert_allclose(at(2.0, "increasing"), [1, 0.975, 0.95, 0.925], rtol=1e-6)
    np.testing.assert_allclose(at(5.0, "decreasing"), [1, 1, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(at(1.0, "decreasing"), s, rtol=1e-6)
    chan = time_dependent_skip_scales((1.0, jnp.array([0.5, 0.7])), 3.0, window=(1.0, 5.0),
                                      profile="increasing")  # w = 0.5, per-channel entries too
    np.testing.assert_allclose(chan[1], [0.75, 0.85], rtol=1e-6)
    with pytest.raises(ValueError, match="valid choices"):
        time_dependent_skip_scales(s, 1.0, profile="cosine")
    with pytest.raises(ValueError, match="finite for 'decreasing'"):
        time_dependent_skip_scales(s, 1.0, profile="decreasing")
    with pytest.warns(UserWarning, match="range is rho < 1"):
        linear_skip_scales(NET, 1.0, 1.2)


def test_windowed_sweep_applies_the_setting_only_inside(tiny):
    """EDM grid 80, 9.72, 0.470, 0.002 (3 DEIS steps): window (1, 20) holds only the second
    model call; the reference switches between the plain and the tuned model by sigma."""
    den, variables, _, labels = tiny
    tuned = linear_skip_scales(NET, 1.0, 0.6)
    sweep, _ = get_sweep_fn(den, sampler="deis_tab", steps=3, order=2, window=(1.0, 20.0))
    key = jax.random.key(4)
    out = sweep(variables, stack_skip_scales([jnp.ones(4), tuned]), key, labels)
    noise = jax.random.normal(key, (4, 8, 8, 1))

    def model_fn(x, t):
        inside = (t >= 1.0) & (t <= 20.0)
        return jnp.where(inside[:, None, None, None],
                         den.apply(variables, x, t, labels, skip_scales=tuned),
                         den.apply(variables, x, t, labels))

    ref = jnp.clip(jax.jit(lambda n: sample(model_fn, n, schedule=schedules.edm(0.002, 80.0),
                                            sampler="deis_tab", steps=3, order=2,
                                            prediction="x0")[0])(noise), -1, 1)
    np.testing.assert_allclose(out[1], ref, atol=1e-5)
    assert float(jnp.abs(out[1] - out[0]).max()) > 1e-3  # the window's one call matters


def test_search_picks_the_setting_that_matches_the_reference(tiny):
    den, variables, _, _ = tiny
    settings = {(1.0, r): linear_skip_scales(NET, 1.0, r) for r in (0.6, 1.0, 1.3)}
    sweep, _ = get_sweep_fn(den, sampler="edm_heun", steps=2)
    key = jax.random.key(3)
    feature_fn = lambda im: im.reshape(im.shape[0], 16, 4).mean(-1)  # (B, 16) pooled pixels
    # reference statistics = those of setting (1.0, 1.3)'s own samples: its distance is ~0
    kb = jax.random.fold_in(key, 0)
    labels = jax.random.randint(jax.random.fold_in(kb, 1), (32,), 0, 3)
    every = sweep(variables, stack_skip_scales(list(settings.values())), kb, labels)
    ref = every[2]
    mu, sigma = mean_cov(np.asarray(feature_fn(ref), np.float64))
    metric = FrechetMetric("fd", feature_fn, mu, sigma)
    best, table = search(sweep, variables, settings, metric=metric, key=key, num_samples=32,
                         batch_size=32, num_classes=3)
    assert best == (1.0, 1.3) and [r["setting"] for r in table] == list(settings)
    assert table[2]["fd"] < 1e-6 < min(table[0]["fd"], table[1]["fd"])
    classify = lambda im: im.reshape(len(im), -1)[:, :3]  # "class" = brightest of 3 pixels
    rows = evaluate_settings(sweep, variables, stack_skip_scales(list(settings.values())),
                             metric=metric, key=key, num_samples=32, batch_size=32,
                             num_classes=3, classify_fn=classify)
    # one batch with the same key and labels as `every`: the accuracy counted by hand
    by_hand = [float(np.mean(np.argmax(classify(np.asarray(im)), -1) == np.asarray(labels)))
               for im in every]
    assert [r["class_accuracy"] for r in rows] == pytest.approx(by_hand, abs=1e-12)


def test_loss_by_sigma_shapes_and_known_cases(tiny):
    den, variables, x, labels = tiny
    sigmas = jnp.array([1e-5, 0.5, 5.0])
    flat = lambda im: im.reshape(im.shape[0], -1)  # identity features: feature loss = pixel loss
    key = jax.random.key(4)
    plain = denoising_loss_by_sigma(den, variables, x, labels, sigmas, feature_fn=flat, key=key)
    assert plain["pixel"].shape == plain["feature"].shape == (3,)
    np.testing.assert_allclose(plain["feature"], plain["pixel"], rtol=1e-5)
    assert plain["pixel"][0] < 1e-5  # EDM precond: D(x; sigma -> 0) -> x
    # the definition, by hand, at sigma = 0.5
    noise = jax.random.normal(key, x.shape)
    d = jax.jit(den.apply)(variables, x + 0.5 * noise, 0.5, labels)
    np.testing.assert_allclose(plain["pixel"][1], jnp.mean((d - x) ** 2), rtol=1e-5)
    ones = denoising_loss_by_sigma(den, variables, x, labels, sigmas, feature_fn=flat, key=key,
                                   skip_scales=jnp.ones(4))
    np.testing.assert_array_equal(ones["pixel"], plain["pixel"])
    tuned = denoising_loss_by_sigma(den, variables, x, labels, sigmas, key=key,
                                    skip_scales=linear_skip_scales(NET, 1.0, 0.7))
    assert np.isnan(tuned["feature"]).all() and abs(tuned["pixel"][2] - plain["pixel"][2]) > 1e-6
