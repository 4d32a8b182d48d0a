"""Frechet distance, streaming statistics, the digits feature network, batched evaluation."""
import functools
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


def test_evaluate_digits_real_vs_noise(digits_cache, tmp_path):
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
    # a resumable evaluation (experiments' --store) gives the same numbers, stored and read back
    for _ in range(2):
        assert M.evaluate_digits(real_fn, **kw, store=str(tmp_path), store_tag="real") == real
    assert len(os.listdir(tmp_path)) == 1
    with pytest.raises(ValueError, match="16x16"):
        M.evaluate_digits(noise_fn, **{**kw, "resolution": 8})


def test_quantize_to_uint8_levels():
    x = jnp.array([-1.0, -0.999, 0.0, 0.5, 1.0, 1.2])
    q = np.asarray(M.quantize_to_uint8_levels(x))
    levels = (q + 1) * 127.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert q[0] == -1.0 and q[-1] == 1.0 and q[-2] == 1.0


# ----------------------------------------------------------------------------
# Error bars


def test_bootstrap_interval_of_a_mean_covers_the_truth():
    rng = np.random.default_rng(3)
    covered = 0
    for trial in range(60):
        x = rng.normal(size=200)
        low, high = M.bootstrap_interval(lambda idx: x[idx].mean(), 200,
                                         key=jax.random.key(trial), num_resamples=200)
        assert low < x.mean() < high
        assert high - low == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.3)
        covered += low <= 0.0 <= high
    assert covered >= 51  # nominal 95% of 60 = 57; 51 is 2.7 binomial sd below


def test_frechet_jackknife_interval_is_centred_deterministic_and_checked():
    rng = np.random.default_rng(4)
    # features ~ N(0, diag(1, 4)); reference N((1, 0), I): d^2 = 1 + (2 - 1)^2 = 2
    feats = rng.normal(size=(4000, 2)) * np.array([1.0, 2.0])
    mu, sigma = np.array([1.0, 0.0]), np.eye(2)
    key = jax.random.key(0)
    low, high = M.frechet_jackknife_interval(feats, mu, sigma, key=key)
    estimate = M.frechet_distance(*M.mean_cov(feats), mu, sigma, method="eigh")
    assert (low + high) / 2 == pytest.approx(estimate, rel=1e-12)
    assert low < 2.0 < high and high - low < 0.5
    assert M.frechet_jackknife_interval(feats, mu, sigma, key=key) == (low, high)
    assert M.frechet_jackknife_interval(feats, mu, sigma, key=jax.random.key(1)) != (low, high)
    with pytest.raises(ValueError, match="level"):
        M.frechet_jackknife_interval(feats, mu, sigma, key=key, level=95)
    with pytest.raises(ValueError, match="groups"):
        M.frechet_jackknife_interval(feats[:5], mu, sigma, key=key)


def test_frechet_jackknife_interval_has_the_spread_of_independent_sample_sets():
    # Many features, few samples (the regime where a bootstrap fails: see confidence.py):
    # the jackknife's half-width / t must match the spread of the distance over independent
    # sample sets, and the intervals must cover the mean distance at this N as often as stated.
    rng = np.random.default_rng(6)
    d, n = 32, 300
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    sigma = a @ a.T + 0.1 * np.eye(d)
    chol = np.linalg.cholesky(sigma)
    draw = lambda: rng.normal(size=(n, d)) @ chol.T * 1.1 + 0.05
    fd = lambda f: M.frechet_distance(*M.mean_cov(f), np.zeros(d), sigma, method="eigh")
    spread = np.std([fd(draw()) for _ in range(60)], ddof=1)
    centre = np.mean([fd(draw()) for _ in range(60)])
    t = 2.0638985616280205  # t_{0.975, 24}
    intervals = [M.frechet_jackknife_interval(draw(), np.zeros(d), sigma, key=jax.random.key(i))
                 for i in range(30)]
    se = np.median([(hi - lo) / (2 * t) for lo, hi in intervals])
    assert 0.75 < se / spread < 1.5, (se, spread)
    assert sum(lo <= centre <= hi for lo, hi in intervals) >= 25  # nominal 95% of 30


def test_frechet_difference_interval_exact_cases():
    rng = np.random.default_rng(9)
    feats = rng.normal(size=(600, 3)) * np.array([1.0, 2.0, 0.5])
    mu, sigma, key = np.array([0.3, 0.0, -0.2]), np.diag([1.0, 3.0, 0.5]), jax.random.key(0)
    assert M.frechet_difference_interval(feats, feats, mu, sigma, key=key) == (0.0, 0.0)
    # a constant shift changes only the mean term: the exact difference is known
    delta = np.array([0.2, -0.1, 0.05])
    m = feats.mean(0)
    exact = np.sum((m + delta - mu) ** 2) - np.sum((m - mu) ** 2)
    low, high = M.frechet_difference_interval(feats + delta, feats, mu, sigma, key=key)
    assert (low + high) / 2 == pytest.approx(exact, rel=1e-9)
    # each left-out difference is 2 delta.(m_g - mu) + |delta|^2, m_g the mean without group g
    order = np.asarray(jax.random.permutation(key, 600))
    d = [2 * delta @ (np.delete(feats, idx, 0).mean(0) - mu) + delta @ delta
         for idx in np.array_split(order, 25)]
    se = np.sqrt(24 / 25 * np.sum((d - np.mean(d)) ** 2))
    assert (high - low) / 2 == pytest.approx(2.0638985616280205 * se, rel=1e-6)  # t_{0.975, 24}
    with pytest.raises(ValueError, match="one shape"):
        M.frechet_difference_interval(feats, feats[:-1], mu, sigma, key=key)


@pytest.mark.parametrize("effect, interval, claim, tolerance, verdict", [
    (-0.3, (-0.5, -0.1), "lower", 0.0, "holds"),
    (-0.1, (-0.3, 0.1), "lower", 0.0, "holds partly"),
    (0.1, (-0.1, 0.3), "lower", 0.0, "does not hold here"),
    (0.05, (-0.05, 0.15), "no_worse", 0.2, "holds"),
    (0.15, (0.05, 0.25), "no_worse", 0.2, "holds partly"),
    (0.5, (0.3, 0.7), "no_worse", 0.2, "does not hold here"),
])
def test_claim_verdict_rules(effect, interval, claim, tolerance, verdict):
    assert M.claim_verdict(effect, interval, claim, tolerance=tolerance) == verdict


def test_format_interval():
    assert M.format_interval(0.12345, 0.1, 0.15) == "0.123 [0.100, 0.150]"
    assert M.format_interval(0.12, -0.01, 0.25, signed=True, digits=2) == "+0.12 [-0.01, +0.25]"


def test_claim_verdict_checks_its_input():
    with pytest.raises(ValueError, match="lower, no_worse"):
        M.claim_verdict(0.0, (0.0, 0.0), "better")
    with pytest.raises(ValueError, match="tolerance"):
        M.claim_verdict(0.0, (0.0, 0.0), "no_worse", tolerance=-1.0)


def test_mean_interval_over_seeds():
    mean, low, high = M.mean_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / np.sqrt(3)  # t_{0.975, 2} (tables) * s / sqrt(3), s = 1
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-9)
    rng = np.random.default_rng(5)
    covered = sum(lo <= 0.0 <= hi for _, lo, hi in (M.mean_interval(rng.normal(size=3))
                                                    for _ in range(400)))
    assert 360 <= covered <= 400  # nominal 380
    with pytest.raises(ValueError, match="at least 2"):
        M.mean_interval([1.0])


def test_evaluate_samples_bootstrap_intervals():
    data = np.random.default_rng(8).normal(size=(40, 2, 2, 1)).astype(np.float32)
    labels = np.arange(40) % 3

    def sample_fn(key, batch_size):
        i = int(jax.random.randint(key, (), 0, 1000)) % 4  # any batch; deterministic in key
        return jnp.asarray(data[i * 10:(i + 1) * 10]), jnp.asarray(labels[i * 10:(i + 1) * 10])

    flat = lambda x: x.reshape(x.shape[0], -1)
    metric = M.FrechetMetric("fd_flat", flat, np.zeros(4), np.eye(4))
    classify = lambda x: jax.nn.one_hot(jnp.zeros(x.shape[0], jnp.int32), 3)  # always class 0
    kw = dict(key=jax.random.key(0), num_samples=30, batch_size=10, frechet_metrics=[metric],
              classify_fn=classify, progress=False, bootstrap=50)
    out = M.evaluate_samples(sample_fn, **kw)
    assert out == M.evaluate_samples(sample_fn, **kw)
    assert out["fd_flat_ci_low"] < out["fd_flat_ci_high"]
    # the same groups / resamples as direct intervals over the drawn samples (key of batch 3)
    batches = [sample_fn(jax.random.fold_in(kw["key"], i), 10) for i in range(3)]
    feats = np.concatenate([flat(np.asarray(b[0])) for b in batches]).astype(np.float64)
    hits = np.concatenate([np.asarray(b[1]) == 0 for b in batches])
    ci_key = jax.random.fold_in(kw["key"], 3)
    assert (out["fd_flat_ci_low"], out["fd_flat_ci_high"]) == pytest.approx(
        M.frechet_jackknife_interval(feats, np.zeros(4), np.eye(4), key=ci_key, groups=25))
    assert (out["class_accuracy_ci_low"], out["class_accuracy_ci_high"]) == pytest.approx(
        M.bootstrap_interval(lambda idx: hits[idx].mean(), 30, key=ci_key, num_resamples=50))
    assert out["class_accuracy_ci_low"] <= out["class_accuracy"] <= out["class_accuracy_ci_high"]


def test_evaluate_samples_paired_differences_to_a_baseline_setting():
    data = np.random.default_rng(10).normal(size=(40, 2, 2, 1)).astype(np.float32)
    shift = np.float32(0.3)

    def sample_fn(key, batch_size):  # setting 1 = setting 0 shifted, on the same draws
        i = int(jax.random.randint(key, (), 0, 1000)) % 4
        x = jnp.asarray(data[i * 10:(i + 1) * 10])
        return jnp.stack([x, x + shift])

    flat = lambda x: x.reshape(x.shape[0], -1)
    metric = M.FrechetMetric("fd_flat", flat, np.zeros(4), np.eye(4))
    key = jax.random.key(0)
    base, shifted = M.evaluate_samples(sample_fn, key=key, num_samples=30, batch_size=10,
                                       frechet_metrics=[metric], progress=False, settings=2,
                                       baseline=0)
    assert (base["fd_flat_diff"], base["fd_flat_diff_ci_low"], base["fd_flat_diff_ci_high"]) == (
        0.0, 0.0, 0.0)
    assert shifted["fd_flat_diff"] == pytest.approx(shifted["fd_flat"] - base["fd_flat"])
    feats = np.concatenate([flat(np.asarray(sample_fn(jax.random.fold_in(key, i), 10)[0]))
                            for i in range(3)]).astype(np.float64)
    assert (shifted["fd_flat_diff_ci_low"], shifted["fd_flat_diff_ci_high"]) == pytest.approx(
        M.frechet_difference_interval(feats + shift, feats, np.zeros(4), np.eye(4),
                                      key=jax.random.fold_in(key, 3)))
    with pytest.raises(ValueError, match="baseline 2 must index"):
        M.evaluate_samples(sample_fn, key=key, num_samples=30, batch_size=10,
                           frechet_metrics=[metric], progress=False, settings=2, baseline=2)


def test_evaluate_samples_store_resumes_an_interrupted_evaluation(tmp_path):
    data = np.random.default_rng(11).normal(size=(40, 2, 2, 1)).astype(np.float32)
    calls = []

    def sample_fn(key, batch_size, fail_at=None):  # settings 2: the data and the data shifted
        i = int(jax.random.randint(key, (), 0, 1000)) % 4
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        calls.append(i)
        x = jnp.asarray(data[i * 10:(i + 1) * 10])
        return jnp.stack([x, x + 0.3]), jnp.asarray(np.arange(10) % 3)

    flat = lambda x: x.reshape(x.shape[0], -1)
    metric = M.FrechetMetric("fd_flat", flat, np.zeros(4), np.eye(4))
    classify = lambda x: jax.nn.one_hot((x[:, 0, 0, 0] > 0).astype(jnp.int32), 3)
    kw = dict(key=jax.random.key(0), num_samples=38, batch_size=10, frechet_metrics=[metric],
              classify_fn=classify, progress=False, settings=2, baseline=0, bootstrap=20)
    want = M.evaluate_samples(sample_fn, **kw)
    store, tag = str(tmp_path), "model A, sampler B"
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # interrupted while drawing the third batch
        M.evaluate_samples(functools.partial(sample_fn, fail_at=2), **kw, store=store,
                           store_tag=tag)
    drawn = list(calls)
    (cell,) = os.listdir(store)
    assert cell == f"model_A_sampler_B-{M.fingerprint(tag)}"
    assert len(drawn) == 2 and sorted(os.listdir(tmp_path / cell)) == [
        "batch_00000.npz", "batch_00001.npz", "store.json"]
    got = M.evaluate_samples(sample_fn, **kw, store=store, store_tag=tag)
    assert calls[2:] == want_draws_after(drawn, 4)  # only batches 2 and 3 are drawn again
    assert got == want  # the same result as without interruption, intervals included
    calls.clear()
    assert M.evaluate_samples(sample_fn, **kw, store=store, store_tag=tag) == want and not calls
    assert M.fingerprint({"w": np.ones(3)}) != M.fingerprint({"w": np.ones(3) * 2})
    with pytest.raises(ValueError, match="num_samples: 38 -> 30"):
        M.evaluate_samples(sample_fn, **{**kw, "num_samples": 30}, store=store, store_tag=tag)


def want_draws_after(drawn, num_batches):
    """The batch indices (as sample_fn sees them) of the batches not yet drawn."""
    keys = [int(jax.random.randint(jax.random.fold_in(jax.random.key(0), i), (), 0, 1000)) % 4
            for i in range(num_batches)]
    assert keys[:len(drawn)] == drawn
    return keys[len(drawn):]


def test_dataset_metric_names_each_datasets_metric():
    assert M.dataset_metric("digits").name == "fd_digits"
    assert M.dataset_metric("digits").evaluate is M.evaluate_digits
    assert M.dataset_metric("mnist") == ("fd_mnist", M.evaluate_mnist, M.load_mnist_classifier,
                                         M.mnist_frechet_metric, M.mnist_logits, M.mnist_features)
    with pytest.raises(ValueError, match="digits, mnist"):
        M.dataset_metric("cifar10")


# ----------------------------------------------------------------------------
# MNIST feature network (a tiny stand-in: the real one trains once, on first use)


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mnist_cache"))
    module = importlib.import_module("difflax.metrics.mnist_features")
    mp = pytest.MonkeyPatch()
    tiny = module.train_mnist_classifier
    mp.setattr(module, "train_mnist_classifier",
               lambda: tiny(steps=60, train_size=2000, test_size=1000))
    clf = M.load_mnist_classifier(path)
    mp.undo()
    return path, clf


def test_mnist_classifier_tiny_training_and_cache(mnist_cache, monkeypatch):
    path, clf = mnist_cache
    assert 0.6 < clf.test_accuracy < 1.0  # 60 steps on 2000 digits: well above chance (0.1)
    module = importlib.import_module("difflax.metrics.mnist_features")
    monkeypatch.setattr(module, "train_mnist_classifier", None)  # must come from the cache
    again = M.load_mnist_classifier(path)
    assert again.test_accuracy == clf.test_accuracy
    for a, b in zip(jax.tree.leaves(clf.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(a, b)


def test_evaluate_mnist_real_vs_noise(mnist_cache, tmp_path):
    from difflax.data import load_mnist

    path, clf = mnist_cache
    images, labels = load_mnist("train", 32)
    images, labels = jnp.asarray(images[:3000]), jnp.asarray(labels[:3000])

    def real_fn(key, batch_size):
        idx = jax.random.choice(key, len(labels), (batch_size,), replace=False)
        return images[idx], labels[idx]

    def noise_fn(key, batch_size):
        return jax.random.uniform(key, (batch_size, 32, 32, 1), minval=-1, maxval=1)

    kw = dict(key=jax.random.key(0), num_samples=500, batch_size=250, resolution=32,
              cache_dir=path, progress=False, bootstrap=50)
    real = M.evaluate_mnist(real_fn, **kw)
    noise = M.evaluate_mnist(noise_fn, **kw)
    assert M.evaluate_mnist(real_fn, **kw, store=str(tmp_path), store_tag="real") == real
    assert real["mnist_classifier_test_accuracy"] == clf.test_accuracy
    assert real["class_accuracy"] > 0.6
    assert real["class_accuracy_ci_low"] <= real["class_accuracy"] <= real["class_accuracy_ci_high"]
    assert 0 <= real["fd_mnist"] < 0.1 * noise["fd_mnist"]
    assert real["fd_mnist_ci_high"] < noise["fd_mnist_ci_low"]
    with pytest.raises(ValueError, match="32x32"):
        M.evaluate_mnist(noise_fn, **{**kw, "resolution": 16})
