"""Frechet distance, streaming statistics, the digits feature network, batched evaluation."""
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from difflax import metrics as M


def _random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------
# Frechet distance


def test_frechet_matches_direct_scipy_formula():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = _random_cov(rng, 5), _random_cov(rng, 5)
    direct = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-10)
    # symmetric, and zero between a distribution and itself
    assert M.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(direct, rel=1e-8)
    assert abs(M.frechet_distance(mu1, s1, mu1, s1)) < 1e-8


def test_frechet_closed_form_for_gaussians():
    # Commuting covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(l1_i) - sqrt(l2_i))^2
    # in a common eigenbasis (the 2-Wasserstein distance between the Gaussians).
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    l1, l2 = np.array([0.5, 1.0, 2.0, 4.0]), np.array([3.0, 0.2, 1.0, 1.5])
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    got = M.frechet_distance(mu1, q @ np.diag(l1) @ q.T, mu2, q @ np.diag(l2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)
    assert M.frechet_distance(mu1, q @ np.diag(l1) @ q.T, mu2, q @ np.diag(l2) @ q.T,
                              method="eigh") == pytest.approx(expected, rel=1e-9)
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2
    assert M.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)


def test_frechet_eigh_method_agrees_with_sqrtm():
    rng = np.random.default_rng(7)
    for d in (1, 3, 30):
        x, y = rng.normal(size=(200, d)), rng.normal(size=(150, d)) * 1.3 + 0.2
        args = (*M.mean_cov(x), *M.mean_cov(y))
        assert M.frechet_distance(*args, method="eigh") == pytest.approx(
            M.frechet_distance(*args), rel=1e-9)


def test_frechet_matches_pytorch_fid_when_installed():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = _random_cov(rng, 6), _random_cov(rng, 6)
    ref = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-10)


def test_frechet_singular_covariances_are_handled():
    # rank-deficient covariances (fewer samples than dimensions): finite result
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(3, 8)), rng.normal(size=(3, 8)) + 1.0
    d = M.frechet_distance(*M.mean_cov(x), *M.mean_cov(y))
    assert np.isfinite(d) and d > 0


def test_streaming_stats_equal_full_batch_stats():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(103, 7)) * 3.0 + 1e3  # large offset: tests the stable update
    stats = M.init_stats(7)
    for lo, hi in [(0, 1), (1, 40), (40, 41), (41, 103)]:
        stats = M.update_stats(stats, x[lo:hi])
    mu, sigma = M.stats_mean_cov(stats)
    assert stats.count == 103
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    # merging in the other order gives the same statistics
    merged = M.merge_stats(M.update_stats(M.init_stats(7), x[50:]), M.update_stats(M.init_stats(7), x[:50]))
    np.testing.assert_allclose(M.stats_mean_cov(merged)[1], sigma, rtol=1e-9)


def test_stats_npz_round_trip_uses_pytorch_fid_keys(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = rng.normal(size=3), _random_cov(rng, 3)
    path = tmp_path / "ref.npz"
    M.save_stats(path, mu, sigma)
    with np.load(path) as f:
        assert set(f.files) == {"mu", "sigma"}
    mu2, sigma2 = M.load_stats(path)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    with pytest.raises(FileNotFoundError, match="mu"):
        M.load_stats(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------
# Digits feature network


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("difflax_cache"))
    clf = M.load_digits_classifier(path)
    return path, clf


def test_digits_classifier_accuracy_and_cache(digits_cache, monkeypatch):
    path, clf = digits_cache
    assert clf.test_accuracy > 0.95
    assert os.listdir(path)  # cached
    # a second load comes from the cache (no training) with the same parameters
    module = importlib.import_module("difflax.metrics.digits_features")
    monkeypatch.setattr(module, "train_digits_classifier", None)
    again = M.load_digits_classifier(path)
    assert again.test_accuracy == clf.test_accuracy
    for a, b in zip(jax.tree.leaves(clf.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(a, b)


def test_digits_cache_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFLAX_CACHE", str(tmp_path))
    assert M.default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("DIFFLAX_CACHE")
    assert M.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "difflax")


def test_digits_training_is_deterministic():
    a = M.train_digits_classifier(steps=20)
    b = M.train_digits_classifier(steps=20)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_digits_classifier_any_resolution(digits_cache, resolution):
    _, clf = digits_cache
    images, labels = M.real_digits(resolution)
    assert images.shape == (1797, resolution, resolution, 1)
    assert images.min() >= -1 and images.max() <= 1
    assert M.digits_features(clf.params, images[:5]).shape == (5, 64)
    assert M.class_accuracy(clf.params, images, labels) > 0.95


# ----------------------------------------------------------------------------
# Batched evaluation


def test_evaluate_samples_streams_like_one_batch():
    data = np.random.default_rng(6).normal(size=(23, 2, 2, 1)).astype(np.float32)
    calls = []

    def sample_fn(key, batch_size):
        i = len(calls)
        calls.append(batch_size)
        idx = (np.arange(batch_size) + i * batch_size) % len(data)
        return jnp.asarray(data[idx]), jnp.asarray(idx % 3)

    flat = lambda x: x.reshape(x.shape[0], -1)
    ref_mu, ref_sigma = np.zeros(4), np.eye(4)
    metric = M.FrechetMetric("fd_flat", flat, ref_mu, ref_sigma)
    classify = lambda x: jax.nn.one_hot(jnp.zeros(x.shape[0], jnp.int32), 3)  # always class 0
    out = M.evaluate_samples(sample_fn, key=jax.random.key(0), num_samples=23, batch_size=5,
                             frechet_metrics=[metric], classify_fn=classify, progress=False)
    assert calls == [5] * 5  # fixed batch size (one compilation); the last batch is truncated
    assert out["num_samples"] == 23
    expected = M.frechet_distance(*M.mean_cov(flat(data)), ref_mu, ref_sigma)
    assert out["fd_flat"] == pytest.approx(expected, rel=1e-10)
    assert out["class_accuracy"] == pytest.approx(np.mean(np.arange(23) % 3 == 0))


def test_evaluate_digits_real_vs_noise(digits_cache):
    path, _ = digits_cache
    images, labels = M.real_digits(16)

    def real_fn(key, batch_size):
        idx = jax.random.choice(key, len(labels), (batch_size,), replace=False)
        return jnp.asarray(images)[idx], jnp.asarray(labels)[idx]

    def noise_fn(key, batch_size):
        return jax.random.uniform(key, (batch_size, 16, 16, 1), minval=-1, maxval=1)

    kw = dict(key=jax.random.key(0), num_samples=600, batch_size=200, resolution=16,
              cache_dir=path, progress=False)
    real = M.evaluate_digits(real_fn, **kw)
    noise = M.evaluate_digits(noise_fn, **kw)
    assert real["class_accuracy"] > 0.95
    assert "class_accuracy" not in noise
    assert real["digits_classifier_test_accuracy"] > 0.95
    assert 0 <= real["fd_digits"] < 0.1 * noise["fd_digits"]
    with pytest.raises(ValueError, match="16x16"):
        M.evaluate_digits(noise_fn, **{**kw, "resolution": 8})


def test_quantize_to_uint8_levels():
    x = jnp.array([-1.0, -0.999, 0.0, 0.5, 1.0, 1.2])
    q = np.asarray(M.quantize_to_uint8_levels(x))
    levels = (q + 1) * 127.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert q[0] == -1.0 and q[-1] == 1.0 and q[-2] == 1.0
