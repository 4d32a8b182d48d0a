"""GMem memory bank: building, disk, k-means and SVD compression, sampling, interpolation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax.gmem import (MemoryBank, batch_rows, build_memory_bank, get_batches_fn,
                          interpolate_snippets, kmeans_compress,
                          lerp, load_memory_bank, sample_entries, sample_snippets,
                          save_memory_bank, shard_memory_bank, slerp, svd_compress)
from difflax.training import make_mesh

RNG = np.random.default_rng(0)
IMAGES = jnp.asarray(RNG.normal(size=(50, 4, 4, 1)), jnp.float32)
PROJ = jnp.asarray(RNG.normal(size=(16, 8)), jnp.float32)


def encoder(images):
    return images.reshape(len(images), -1) @ PROJ  # (B, 8), not normalised


def test_bank_holds_normalised_snippets_built_in_batches_and_survives_disk(tmp_path):
    bank = build_memory_bank(encoder, IMAGES, batch_size=16)  # 16, 16, 16, 2
    direct = encoder(IMAGES) / jnp.linalg.norm(encoder(IMAGES), axis=1, keepdims=True)
    np.testing.assert_allclose(bank.snippets_of(jnp.arange(50)), direct, atol=1e-6)
    np.testing.assert_allclose(bank.frequencies, np.ones(50))
    batches = (IMAGES[i:i + 7] for i in range(0, 50, 7))  # any iterable of batches
    np.testing.assert_allclose(build_memory_bank(encoder, batches).entries, bank.entries, atol=1e-6)
    save_memory_bank(tmp_path / "bank.npz", bank)
    loaded = load_memory_bank(tmp_path / "bank.npz")
    assert loaded.basis is None
    np.testing.assert_array_equal(loaded.entries, bank.entries)
    np.testing.assert_array_equal(loaded.assignment, bank.assignment)
    with pytest.raises(FileNotFoundError, match="build_memory_bank"):
        load_memory_bank(tmp_path / "none.npz")


def _clusters(sizes=(30, 20, 10), dim=8, spread=0.05):
    centers = np.eye(dim)[: len(sizes)]
    x = np.concatenate([c + spread * RNG.normal(size=(n, dim)) for c, n in zip(centers, sizes)])
    labels = np.repeat(np.arange(len(sizes)), sizes)
    entries = x / np.linalg.norm(x, axis=1, keepdims=True)
    bank = MemoryBank(entries=jnp.asarray(entries, jnp.float32),
                      frequencies=jnp.ones(len(x), jnp.float32),
                      assignment=jnp.arange(len(x), dtype=jnp.int32))
    return bank, centers, labels


def test_kmeans_finds_the_clusters_with_their_frequencies():
    bank, centers, labels = _clusters()
    small = kmeans_compress(bank, 3, key=jax.random.key(0))
    assert small.entries.shape == (3, 8)
    np.testing.assert_allclose(jnp.linalg.norm(small.entries, axis=1), 1.0, atol=1e-5)
    match = np.argmax(np.asarray(small.entries) @ centers.T, axis=0)  # entry of each true center
    assert sorted(match) == [0, 1, 2]
    np.testing.assert_allclose(np.asarray(small.frequencies)[match], [30, 20, 10])
    np.testing.assert_array_equal(np.asarray(small.assignment), match[labels])  # images re-pointed
    np.testing.assert_allclose(small.lookup(match), centers, atol=0.05)


def test_svd_is_gmems_centred_truncation():
    """GMem's DMDMemoryBank by hand: m = mean, x - m = U S V^T, C = U_k sqrt(S_k), M = V_k
    sqrt(S_k), get(i) = C_i M^T + m (not re-normalised)."""
    x = RNG.normal(size=(30, 6)) + 2.0  # far from centred
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    bank = MemoryBank(entries=jnp.asarray(x, jnp.float32), frequencies=jnp.ones(30),
                      assignment=jnp.arange(30))
    m = x.mean(0)
    u, sv, vt = np.linalg.svd(x - m, full_matrices=False)
    c, mm = u[:, :2] * np.sqrt(sv[:2]), vt[:2].T * np.sqrt(sv[:2])
    low = svd_compress(bank, 2)
    np.testing.assert_allclose(low.lookup(jnp.arange(30)), c @ mm.T + m, atol=1e-5)
    np.testing.assert_allclose(low.mean, m, atol=1e-6)
    uncentred = np.linalg.svd(x, full_matrices=False)
    plain = (x @ uncentred[2][:2].T) @ uncentred[2][:2]
    assert np.abs(plain - (c @ mm.T + m)).max() > 1e-2  # centring changes the answer


def test_gmem_interpolations():
    a, b = jnp.array([1.0, 0.0, 0.0, 0.0]), jnp.array([0.0, 0.0, 0.6, 0.8])
    np.testing.assert_allclose(interpolate_snippets(a, b, 0.5, method="linear"),
                               np.array([0.5, 0, 0.3, 0.4]) / np.sqrt(0.5), atol=1e-6)
    np.testing.assert_allclose(interpolate_snippets(a, b, 0.5, method="spherical"),
                               slerp(a, b, 0.5), atol=1e-6)
    # concat: a's first half, b's second half, normalised: (1, 0, 0.6, 0.8) / sqrt(2)
    np.testing.assert_allclose(interpolate_snippets(a, b, 0.3, method="concat"),
                               np.array([1, 0, 0.6, 0.8]) / np.sqrt(2), atol=1e-6)
    big_a, big_b = jnp.ones(1000), -jnp.ones(1000)
    mixed = np.asarray(interpolate_snippets(big_a, big_b, 0.0, method="mask",
                                            key=jax.random.key(0))) * np.sqrt(1000)
    assert set(np.round(mixed, 5)) == {-1.0, 1.0} and abs(np.mean(mixed > 0) - 0.5) < 0.05
    with pytest.raises(ValueError, match="valid choices"):
        interpolate_snippets(a, b, 0.5, method="cubic")
    with pytest.raises(ValueError, match="needs key"):
        interpolate_snippets(a, b, 0.5, method="mask")


def test_svd_basis_reconstructs_snippets_in_its_subspace():
    basis = np.linalg.qr(RNG.normal(size=(8, 3)))[0].T  # (3, 8) orthonormal rows
    x = RNG.normal(size=(40, 3)) @ basis
    bank = MemoryBank(entries=jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), jnp.float32),
                      frequencies=jnp.ones(40), assignment=jnp.arange(40))
    low = svd_compress(bank, 3)
    assert low.entries.shape == (40, 3) and low.basis.shape == (3, 8) and low.dim == 8
    np.testing.assert_allclose(low.lookup(jnp.arange(40)), bank.entries, atol=1e-5)
    worse = svd_compress(bank, 2)  # a smaller rank loses part of the snippets
    assert float(jnp.abs(worse.lookup(jnp.arange(40)) - bank.entries).max()) > 1e-2
    with pytest.raises(ValueError, match="rank"):
        svd_compress(bank, 9)


def test_sampling_uniform_or_by_frequency_and_never_the_padding():
    bank = MemoryBank(entries=jnp.eye(3, dtype=jnp.float32),
                      frequencies=jnp.array([1.0, 9.0, 0.0]), assignment=jnp.arange(3))
    key = jax.random.key(0)
    by_freq = np.asarray(sample_entries(bank, key, 20000, by="frequency"))
    uniform = np.asarray(sample_entries(bank, key, 20000))
    assert abs(np.mean(by_freq == 1) - 0.9) < 0.01 and not np.any(by_freq == 2)
    assert abs(np.mean(uniform == 1) - 0.5) < 0.015 and not np.any(uniform == 2)
    assert sample_snippets(bank, key, 5).shape == (5, 3)
    with pytest.raises(ValueError, match="'uniform', 'frequency'|uniform, frequency"):
        sample_entries(bank, key, 2, by="random")
    mesh = make_mesh()  # the forced host devices of conftest
    b10 = build_memory_bank(encoder, IMAGES[:10])
    sharded = shard_memory_bank(b10, mesh)
    assert sharded.size % mesh.size == 0 and sharded.size >= 10
    draws = np.asarray(sample_entries(sharded, key, 5000))
    assert draws.max() < 10  # the padding rows are never drawn
    np.testing.assert_allclose(sharded.lookup(jnp.arange(10)), b10.entries, atol=1e-6)


def test_interpolation_linear_and_spherical():
    a, b = jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 1.0, 0.0])
    w = jnp.linspace(0, 1, 5)
    for f in (lerp, slerp):
        path = f(a, b, w)
        assert path.shape == (5, 3)
        np.testing.assert_allclose(path[0], a, atol=1e-6)
        np.testing.assert_allclose(path[-1], b, atol=1e-6)
        np.testing.assert_allclose(jnp.linalg.norm(path, axis=-1), 1.0, atol=1e-6)
    # slerp moves at constant angular speed: angle(a, slerp(w)) = w * 90 degrees
    np.testing.assert_allclose(jnp.arccos(jnp.clip(slerp(a, b, w) @ a, -1, 1)), w * np.pi / 2,
                               atol=1e-3)
    # lerp does not: its midpoint is the same direction, its quarter points are not
    np.testing.assert_allclose(lerp(a, b, 0.5), slerp(a, b, 0.5), atol=1e-6)
    assert float(jnp.abs(lerp(a, b, 0.25) - slerp(a, b, 0.25)).max()) > 1e-2
    np.testing.assert_allclose(slerp(a, a, 0.3), a, atol=1e-6)  # parallel: no division by 0


def test_batches_keep_each_image_with_its_snippet_and_repa_target():
    images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    labels, snippets = np.arange(10) % 3, np.arange(10.0)[:, None] * [1.0, 2.0]
    targets = np.arange(10.0)[:, None, None] * np.ones((1, 4, 3))  # (N, T, D) per token
    make = get_batches_fn(images, labels, snippets, batch_size=6, seed=5, repa_targets=targets)
    batches = make(2)  # resumes at step 3
    for step in (3, 4):
        x, y, s, z = next(batches)
        idx = batch_rows(5, step, 10, 6)
        np.testing.assert_array_equal(x[:, 0, 0, 0], idx)
        np.testing.assert_array_equal(y, idx % 3)
        np.testing.assert_array_equal(s[:, 1], 2.0 * idx)
        np.testing.assert_array_equal(z[:, 2, 1], idx)
    x, y, z = next(get_batches_fn(images, labels, None, batch_size=6, seed=5,
                                  repa_targets=targets[:, 0])(0))  # no snippets: targets third
    np.testing.assert_array_equal(z[:, 0], x[:, 0, 0, 0])
