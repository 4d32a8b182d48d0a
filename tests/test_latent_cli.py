"""SiT and GMem on stored latents through the command line: encode -> train -> sample."""
import json
import os
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from difflax import cli, configs, data, metrics, workdir as wd
from difflax.images import make_grid
from difflax.latent_runs import get_decode_fn
from difflax.latents import load_latents
from sd_folders import save_tiny_vae

pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "digits_latent_sit.py")


@pytest.fixture(scope="module")
def latents_dir(tmp_path_factory):
    """The digits at 8x8 encoded by a tiny random diffusers VAE (4x4x2 latents), with the
    digits classifier's snippets."""
    root = tmp_path_factory.mktemp("latent")
    save_tiny_vae(root / "vae")
    out = str(root / "latents")
    assert cli.main(["encode", "--vae", str(root / "vae"), "--data", "digits", "--resolution",
                     "8", "--out", out, "--features", "digits_classifier"]) == 0
    return out


def train(variant, workdir, latents_dir, *extra):
    return cli.main(["train", "--config", f"{CONFIG}:{variant}", "--workdir", str(workdir),
                     f"--config.data.latents_dir={latents_dir}", *extra])


@pytest.fixture(scope="module")
def sit_run(latents_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sit")
    assert train("smoke", workdir, latents_dir) == 0
    return str(workdir)


def test_encode_stores_unit_snippets_of_both_flips(latents_dir):
    stored = load_latents(latents_dir)
    assert stored["features"].shape == (1797, 2, 64)
    np.testing.assert_allclose(np.linalg.norm(stored["features"], axis=-1), 1.0, rtol=1e-5)
    # the flip's snippet is another image's features (the classifier is not flip-invariant)
    assert np.abs(stored["features"][:, 0] - stored["features"][:, 1]).max() > 1e-2
    info = json.load(open(os.path.join(latents_dir, "latents.json")))
    assert (info["feature_dim"], info["num_classes"], info["image_channels"]) == (64, 10, 1)


def test_train_sit_on_latents_checkpoints_and_resumes_exactly(sit_run, latents_dir, tmp_path):
    steps = sorted(int(p) for p in os.listdir(os.path.join(sit_run, "checkpoints")) if p.isdigit())
    assert steps[-1] == 4
    lines = [json.loads(line) for line in open(os.path.join(sit_run, "metrics.jsonl"))]
    assert [r["step"] for r in lines] == [2, 4] and np.isfinite(lines[-1]["loss"])
    assert os.path.exists(os.path.join(sit_run, "samples", "heun_2.png"))
    # 2 steps, then resumed to 4 from the checkpoint: the same weights as 4 steps at once
    assert train("smoke", tmp_path, latents_dir, "--config.train.steps=2",
                 "--config.train.sample_every=2") == 0
    assert os.path.exists(tmp_path / "samples" / "0000002.png")   # the loop's decoded grid
    assert train("smoke", tmp_path, latents_dir) == 0
    _, model, resumed = wd.load_run(str(tmp_path))
    _, _, direct = wd.load_run(sit_run)
    assert model.config.input_size == 4 and model.config.num_classes == 10
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 resumed, direct)


def test_sample_decodes_the_sampled_latents(sit_run, latents_dir, capsys):
    out = os.path.join(sit_run, "grid")
    assert cli.main(["sample", "--workdir", sit_run, "--num", "10", "--sampler", "euler",
                     "--steps", "2", "--out", out]) == 0
    assert "| euler   | 2   |" in capsys.readouterr().out
    saved = np.load(out + ".npz")
    images, latents = saved["images"], saved["latents"]
    np.testing.assert_array_equal(saved["labels"], np.arange(10))   # one class per column
    assert latents.shape == (10, 4, 4, 2) and images.shape == (10, 8, 8, 1)
    assert np.abs(latents).max() > 1.0     # latents are not clipped like images
    decode = get_decode_fn(latents_dir)    # the VAE folder latents.json records
    np.testing.assert_allclose(images, decode(latents), atol=1e-6)
    assert images.std(axis=0).mean() > 1e-3
    png = np.asarray(Image.open(out + ".png"))
    np.testing.assert_array_equal(png, make_grid(images, nrow=10)[..., 0].repeat(8, 0).repeat(8, 1))


def test_evaluate_scores_the_decoded_samples_on_the_source_dataset(sit_run):
    assert cli.main(["evaluate", "--workdir", sit_run, "--num", "16", "--batch-size", "8"]) == 0
    rows = json.load(open(os.path.join(sit_run, "eval.json")))
    assert (rows[0]["sampler"], rows[0]["steps"], rows[0]["nfe"]) == ("euler", 2, 2)
    # 4 steps of a tiny SiT through a random VAE are far from digits: fd_digits well above
    # that of 16 real 8x8 digits scored the same way
    images, classes = data.load_digits(8)
    baseline = metrics.evaluate_digits(lambda key, n: (images[:n], classes[:n]),
                                       key=jax.random.key(0), num_samples=16, batch_size=16,
                                       resolution=8, progress=False)
    assert rows[0]["fd_digits"] > 2 * baseline["fd_digits"], (rows[0], baseline)
    assert 0 <= rows[0]["class_accuracy"] <= 1


def test_gmem_with_repa_trains_on_snippets_and_samples_from_the_bank(latents_dir, tmp_path):
    assert train("gmem_repa_smoke", tmp_path, latents_dir, "--config.train.steps=2") == 0
    config, model, params = wd.load_run(str(tmp_path))
    assert (model.config.snippet_dim, model.config.num_classes) == (64, 0)
    # REPA's projector (block 1 -> 16 -> 16 -> the 64 stored features) was trained
    assert (model.config.repa_depth, model.config.repa_dim) == (1, 64)
    assert params["repa_projector_2"]["kernel"].shape == (16, 64)
    saved = np.load(tmp_path / "samples" / "heun_2.npz")
    stored = load_latents(latents_dir)
    # the labels saved are those of the bank entries' images: a valid digit for each sample
    assert saved["images"].shape == (8, 8, 8, 1) and set(saved["labels"]) <= set(range(10))
    assert config.model.memory and stored["features"].shape[-1] == 64


@pytest.mark.parametrize("override, message", [
    ("--config.transport.interpolant=cosine", "'transport.interpolant' = 'cosine': must be one"
     " of 'linear', 'gvp', 'vp'"),
    ("--config.sample.method=rk4", "'sample.method' = 'rk4': must be one of 'euler', 'heun'"),
    ("--config.evaluate.samplers=('edm_heun:3',)", "valid: euler, heun (SiT's ODE)"),
    ("--config.data.latents_dir=/nonexistent", "holds no latents"),
])
def test_bad_sit_config_is_one_clear_line(tmp_path, capsys, override, message):
    code = cli.main(["train", "--config", f"{CONFIG}:smoke", "--workdir", str(tmp_path), override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("spec", ["digits_latent_sit.py", "digits_latent_sit.py:gmem",
                                  "digits_latent_sit.py:gmem_repa", "imagenet256_sit.py",
                                  "imagenet256_sit.py:gmem"])
def test_latent_configs_pass_check_config(spec):
    config = configs.load_config(str(ROOT / "configs" / spec))
    configs.check_config(config, num_devices=8)
    assert configs.model_kind(config) == "sit"
