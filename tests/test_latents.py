"""Latent datasets: encoding once with flips, resuming, and the (seed, step) batch iterator."""
import itertools
import os

import jax
import numpy as np
import pytest

from difflax import cli, data
from difflax.latents import encode_dataset, latent_batches, load_latents
from difflax.models.vae import AutoencoderKL, VAEConfig, init_vae
from sd_folders import save_tiny_vae

TINY = VAEConfig(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2,
                 latent_channels=2, scaling_factor=0.5)


def test_encode_dataset_stores_images_and_flips_and_resumes(tmp_path):
    vae = AutoencoderKL(TINY)
    rng = np.random.default_rng(0)   # random variables without compiling Flax's initialisers
    variables = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32),
                             jax.eval_shape(lambda: init_vae(TINY, jax.random.key(0))))
    images, labels = data.load_digits(8)
    images, labels = images[:38], labels[:38]      # chunks of 16, 16, 6 (padded)
    out = str(tmp_path / "latents")
    paths = encode_dataset(vae, variables, images, labels, out, chunk_size=16, progress=False)
    stored = load_latents(out)
    assert stored["mean"].shape == (38, 2, 4, 4, 2) and stored["config"] == TINY
    rgb = np.repeat(images, 3, axis=-1)
    mean, logvar = jax.jit(lambda x: vae.apply(variables, x, method="encode"))(
        np.concatenate([rgb, rgb[:, :, ::-1]]))
    for flip in (0, 1):
        np.testing.assert_allclose(stored["mean"][:, flip], mean[flip * 38:(flip + 1) * 38],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stored["logvar"][:, flip], logvar[flip * 38:(flip + 1) * 38],
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(stored["labels"], labels)
    # a killed run: one chunk missing, a temporary file left behind; running again completes it
    os.remove(paths[1])
    open(paths[1][:-4] + ".tmp.npz", "wb").close()
    with pytest.raises(FileNotFoundError, match="lacks 1 of 3 chunks"):
        load_latents(out)
    encode_dataset(vae, variables, images, labels, out, chunk_size=16, progress=False)
    again = load_latents(out)
    assert sorted(os.listdir(out)) == ["chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz",
                                       "latents.json"]
    np.testing.assert_array_equal(again["mean"], stored["mean"])
    with pytest.raises(ValueError, match="holds other latents .*chunk_size: 16 -> 8"):
        encode_dataset(vae, variables, images, labels, out, chunk_size=8, progress=False)


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    n = 12
    return {"mean": rng.normal(size=(n, 2, 2, 2, 3)).astype(np.float32),
            "logvar": rng.normal(size=(n, 2, 2, 2, 3)).astype(np.float32) - 2,
            "labels": np.arange(n, dtype=np.int32), "config": VAEConfig(scaling_factor=0.5,
                                                                         shift_factor=0.1)}


def test_latent_batches_scale_flip_and_epochs(synthetic):
    scaled = 0.5 * (synthetic["mean"] - 0.1)
    plain = latent_batches(synthetic, 4, seed=1, random_flip=False, sample_posterior=False)
    epoch = list(itertools.islice(plain, 3))      # 12 examples: one epoch, each once
    np.testing.assert_array_equal(np.sort(np.concatenate([y for _, y in epoch])), np.arange(12))
    for z, y in epoch:
        np.testing.assert_allclose(z, scaled[y, 0], rtol=1e-6)
    flips = []
    for z, y in itertools.islice(latent_batches(synthetic, 4, seed=1, sample_posterior=False), 6):
        is_flip = [np.allclose(z[i], scaled[y[i], 1], rtol=1e-6) for i in range(4)]
        assert all(f or np.allclose(z[i], scaled[y[i], 0], rtol=1e-6)
                   for i, f in enumerate(is_flip))
        flips += is_flip
    assert 0 < sum(flips) < len(flips)
    z, y = next(latent_batches(synthetic, 4, seed=1, random_flip=False))   # posterior samples
    assert not np.allclose(z, scaled[y, 0], atol=1e-3)
    assert np.abs(z - scaled[y, 0]).max() < 0.5 * 5 * np.exp(0.5 * synthetic["logvar"]).max()


def test_latent_batches_depend_only_on_seed_and_step(synthetic):
    run = lambda **kw: latent_batches(synthetic, 4, seed=3, **kw)
    first = list(itertools.islice(run(), 5))
    resumed = next(run(start_step=3))
    np.testing.assert_array_equal(resumed[0], first[3][0])
    np.testing.assert_array_equal(resumed[1], first[3][1])
    halves = [next(run(process_index=p, process_count=2)) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h[0] for h in halves]), first[0][0])
    other = next(latent_batches(synthetic, 4, seed=4))
    assert not np.array_equal(other[0], first[0][0])


def test_cli_encode_matches_diffusers(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    model = save_tiny_vae(tmp_path / "vae")
    out = str(tmp_path / "latents")
    argv = ["encode", "--vae", str(tmp_path / "vae"), "--data", "digits", "--resolution", "8",
            "--out", out, "--chunk-size", "1024"]
    assert cli.main(argv) == 0
    assert "| 1797   | 2      |" in capsys.readouterr().out
    stored = load_latents(out)
    assert stored["mean"].shape == (1797, 2, 4, 4, 2)
    images = np.repeat(data.load_digits(8)[0][:8], 3, axis=-1)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(images[:, :, ::-1].transpose(0, 3, 1, 2).copy()))
    ref = posterior.latent_dist.mean.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(stored["mean"][:8, 1], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    argv[argv.index("digits")] = "cifar"
    assert cli.main(argv) == 2
    assert "valid choices: digits, mnist" in capsys.readouterr().err


def test_latent_batches_carry_each_flips_features_as_snippets_and_repa_targets(synthetic):
    # feature f of image i and flip k: 10 i + k, so a batch shows which example and flip it holds
    features = (10.0 * np.arange(12)[:, None, None] + np.arange(2)[None, :, None]) * np.ones(3)
    stored = dict(synthetic, features=features.astype(np.float32))
    scaled = 0.5 * (synthetic["mean"] - 0.1)
    for z, y, snippets, targets in itertools.islice(latent_batches(
            stored, 4, seed=3, sample_posterior=False, snippets=True, repa_targets=True), 3):
        flip = snippets[:, 0] - 10 * y
        assert set(flip) <= {0, 1}
        np.testing.assert_allclose(z, scaled[y, flip.astype(int)], rtol=1e-6)
        np.testing.assert_array_equal(targets, snippets)
    z, y, targets = next(latent_batches(stored, 4, seed=3, sample_posterior=False,
                                        repa_targets=True))   # SiT + REPA: no snippets
    np.testing.assert_array_equal(targets[:, 0] // 10, y)
