"""The command line: train / sample / evaluate on the digits smoke config, configs, bad input."""
import json
import os
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

import difflax
from difflax import cli, configs, data, metrics, workdir as wd
from difflax.images import make_grid

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "digits_edm.py") + ":smoke"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    assert cli.main(["train", "--config", SMOKE, "--workdir", workdir]) == 0
    return workdir


def test_train_writes_checkpoints_metrics_and_grid(trained):
    assert os.path.exists(os.path.join(trained, "config.json"))
    steps = sorted(int(p) for p in os.listdir(os.path.join(trained, "checkpoints")) if p.isdigit())
    assert steps[-1] == 4
    lines = [json.loads(l) for l in open(os.path.join(trained, "metrics.jsonl"))]
    assert lines[-1]["step"] == 4 and np.isfinite(lines[-1]["loss"])
    assert os.path.exists(os.path.join(trained, "samples", "edm_heun_3.png"))


def test_export_then_load_testbed_gives_the_runs_ema_model(trained, tmp_path, capsys):
    out = str(tmp_path / "testbed")
    assert cli.main(["export", "--workdir", trained, "--out", out]) == 0
    config, denoiser, params = wd.load_run(trained)
    config2, denoiser2, params2 = difflax.load_testbed(out)
    assert denoiser2 == denoiser and config2.to_dict() == config.to_dict()
    jax.tree.map(np.testing.assert_array_equal, params2, jax.device_get(params))
    with pytest.raises(FileNotFoundError, match="shipped"):
        difflax.load_testbed(str(tmp_path / "nowhere"))
    other = str(tmp_path / "other")  # weights of another model: named in the error
    cfg = configs.load_config(SMOKE, ("model.model_channels=16",))
    difflax.testbeds.export_params(cfg, params, other)
    with pytest.raises(ValueError, match="does not hold the parameters"):
        difflax.load_testbed(other)


def test_load_run_takes_a_run_an_exported_folder_or_a_shipped_name(trained, tmp_path,
                                                                   monkeypatch):
    config, denoiser, params = wd.load_run(trained)
    shipped = tmp_path / "shipped"
    assert cli.main(["export", "--workdir", trained, "--out", str(shipped / "tiny")]) == 0
    monkeypatch.setattr(difflax.testbeds, "SHIPPED", str(shipped))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
    sigma, labels = np.array([0.5, 2.0], np.float32), np.array([1, 7])
    expected = denoiser.apply({"params": params}, x, sigma, labels)
    for source in (str(shipped / "tiny"), "tiny"):
        config2, denoiser2, params2 = wd.load_run(source)
        assert denoiser2 == denoiser and config2.to_dict() == config.to_dict()
        np.testing.assert_allclose(denoiser2.apply({"params": params2}, x, sigma, labels),
                                   expected, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="shipped: \\['tiny'\\]"):
        wd.load_run("no_such_testbed")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        wd.load_run(str(tmp_path))


def test_train_again_resumes_and_finishes(trained, capsys):
    assert cli.main(["train", "--config", SMOKE, "--workdir", trained,
                     "--config.train.steps=6"]) == 0
    assert "| 6 " in capsys.readouterr().out


def test_sample_writes_png_and_npz(trained, capsys):
    out = os.path.join(trained, "grid")
    assert cli.main(["sample", "--workdir", trained, "--num", "10", "--steps", "2",
                     "--out", out]) == 0
    saved = np.load(out + ".npz")
    images, labels = saved["images"], saved["labels"]
    np.testing.assert_array_equal(labels, np.arange(10))  # one class per column
    # the images are the sampler's own (EMA weights, seed 1, these labels), not merely in range
    config, denoiser, params = wd.load_run(trained)
    sample, _ = wd.get_sample_fn(denoiser, sampler="edm_heun", steps=2,
                                 sigma_min=config.sample.sigma_min,
                                 sigma_max=config.sample.sigma_max)
    expected = np.asarray(sample(params, jax.random.key(config.sample.seed), labels))
    np.testing.assert_allclose(images, expected, atol=1e-5)
    assert images.shape == (10, 16, 16, 1) and images.std(axis=0).mean() > 1e-2  # not one image
    # the PNG shows exactly these images (one row of 10, enlarged 4x)
    png = np.asarray(Image.open(out + ".png"))
    np.testing.assert_array_equal(png, make_grid(images, nrow=10)[..., 0].repeat(4, 0).repeat(4, 1))
    assert "| edm_heun | 3 " in capsys.readouterr().out  # 2 Heun steps = 3 NFE


def test_evaluate_prints_digits_metrics(trained, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAX_CACHE", str(tmp_path))
    assert cli.main(["evaluate", "--workdir", trained, "--num", "16"]) == 0
    out = capsys.readouterr().out
    assert "fd_digits" in out and "class_accuracy" in out
    rows = json.load(open(os.path.join(trained, "eval.json")))
    # a 4-step model's samples are far from digits: fd_digits well above that of 16 real
    # digits drawn the same way (same estimator, same sample count, same classifier)
    images, classes = data.load_digits(16)
    real = lambda key, n: (images[:n], classes[:n])
    baseline = metrics.evaluate_digits(real, key=jax.random.key(0), num_samples=16,
                                       batch_size=16, progress=False)
    assert baseline["class_accuracy"] > 0.9  # the classifier reads real digits
    assert rows[0]["nfe"] == 5 and rows[0]["fd_digits"] > 2 * baseline["fd_digits"], (
        rows[0], baseline)
    assert cli.main(["evaluate", "--workdir", trained, "--num", "8", "--batch-size", "8",
                     "--sampler", "deis_tab2", "--steps", "3"]) == 0
    rows = json.load(open(os.path.join(trained, "eval.json")))
    assert (rows[0]["sampler"], rows[0]["nfe"]) == ("deis_tab2", 3)


@pytest.mark.parametrize("argv, message", [
    (["--config.train.stepz=3"], "unknown config key 'train.stepz' (did you mean 'steps'?)"),
    (["--config.model.model_type=Transformer"], "valid choices: 'SongUNet', 'DhariwalUNet'"),
    (["--config.data.name=cifar"], "unknown dataset 'cifar'; valid choices: digits"),
    (["--config.data.resolution=12"], "resolution"),
    (["--config.model.channel_mult=(1,2,2,2,2,2)"], "not divisible by 32"),
    (["--config.train.steps=abc"], "takes a int"),
    (["--config.train.steps=0"], "config key 'train.steps' = 0: must be an integer >= 1"),
    (["--config.train.batch_size=0"], "'train.batch_size' = 0: must be an integer >= 1"),
    (["--config.train.batch_size=6"], "'train.batch_size' = 6: must be divisible by the 4 devices"),
    (["--config.train.lr=-1"], "'train.lr' = -1.0: must be a number > 0"),
    (["--config.train.keep_checkpoints=0"], "'train.keep_checkpoints' = 0: must be an integer >= 1"),
    (["--config.model.dropout=1.5"], "'model.dropout' = 1.5: must be a number >= 0 and < 1"),
    (["--config.sample.sigma_max=0.001"], "'sample.sigma_max' = 0.001: must be > sample.sigma_min"),
    (["--config.sample.sampler=magic"], "'sample.sampler' = 'magic': must be one of euler"),
    (["--config.evaluate.samplers=('deis_tab3:0',)"], "sampler 'deis_tab3:0' must be NAME:STEPS"),
    (["--config.evaluate.samplers=('magic:3',)"], "unknown sampler 'magic' in 'magic:3'"),
])
def test_bad_config_is_one_clear_line(tmp_path, capsys, argv, message):
    code = cli.main(["train", "--config", SMOKE, "--workdir", str(tmp_path / "w"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("argv, message", [
    (["sample", "--num", "-5"], "--num -5: must be an integer >= 1"),
    (["sample", "--steps", "0"], "--steps 0: must be an integer >= 1"),
    (["sample", "--seed", "-1"], "--seed -1: must be an integer >= 0"),
    (["sample", "--sampler", "magic"], "unknown sampler 'magic'"),
    (["evaluate", "--sampler", "deis_tab3:0"], "sampler 'deis_tab3:0' must be NAME:STEPS"),
    (["evaluate", "--sampler", "deis_tab3", "--steps", "0"], "--steps 0: must be an integer >= 1"),
    (["evaluate", "--num", "0"], "--num 0: must be an integer >= 1"),
    (["evaluate", "--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
])
def test_bad_flag_is_one_clear_line_before_loading_the_run(tmp_path, capsys, argv, message):
    # the workdir holds no run: the flag must be refused before the run is looked at
    code = cli.main([*argv[:1], "--workdir", str(tmp_path), *argv[1:]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_missing_config_lists_every_shipped_config(capsys):
    assert cli.main(["train", "--config", "configs/nope.py", "--workdir", "w"]) == 2
    err = capsys.readouterr().err.strip()
    shipped = sorted(p.name for p in (ROOT / "configs").glob("*.py")
                     if p.name not in ("__init__.py", "default.py"))
    assert len(shipped) >= 8 and all(f"configs/{name}" in err for name in shipped), err
    assert len(err.splitlines()) == 1


def test_experiment_config_is_refused_by_train(tmp_path, capsys):
    code = cli.main(["train", "--config", str(ROOT / "configs" / "digits_sit.py"),
                     "--workdir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "lacks" in err and "experiment script" in err, err


def test_another_architecture_in_the_same_workdir(trained, capsys):
    code = cli.main(["train", "--config", SMOKE, "--workdir", trained,
                     "--config.model.model_channels=4"])
    err = capsys.readouterr().err
    assert code == 2 and "another model" in err and "model_channels" in err


def test_a_model_key_added_since_a_run_counts_as_its_default(tmp_path):
    config = configs.load_config(SMOKE)
    wd.save_config(str(tmp_path), config)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    assert saved["model"]["label_dropout"] == 0.0  # UNetConfig's default
    del saved["model"]["label_dropout"]  # as written by a difflax without the key
    path.write_text(json.dumps(saved))
    wd.save_config(str(tmp_path), config)  # resumes
    del saved["model"]["model_channels"]  # the smoke run is not the default width
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="model_channels: 128"):
        wd.save_config(str(tmp_path), config)
    sit = configs.load_config(str(ROOT / "configs" / "digits_latent_sit.py") + ":smoke")
    wd.save_config(str(tmp_path / "sit"), sit)
    saved = json.loads((tmp_path / "sit" / "config.json").read_text())
    for key in ("repa_depth", "repa_hidden"):  # a SiT run from before REPA
        del saved["model"][key]
    (tmp_path / "sit" / "config.json").write_text(json.dumps(saved))
    wd.save_config(str(tmp_path / "sit"), sit)


def test_unknown_sampler_names_the_valid_ones(trained, capsys):
    assert cli.main(["sample", "--workdir", trained, "--sampler", "magic"]) == 2
    err = capsys.readouterr().err
    assert "unknown sampler 'magic'" in err and "edm_heun" in err


def test_missing_run(tmp_path, capsys):
    assert cli.main(["sample", "--workdir", str(tmp_path)]) == 2
    assert "difflax train" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["cifar10_ddpmpp", "imagenet64_adm"])
def test_real_data_configs_train_one_step_on_mock_data(name, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = configs.load_config(str(ROOT / "configs" / f"{name}.py") + ":smoke")
    with tfds.testing.mock_data(num_examples=8):
        full = configs.denoiser_from_config(configs.load_config(str(ROOT / "configs" / f"{name}.py")))
        assert full.net.model_type == config.model.model_type
        assert cli.main(["train", "--config", str(ROOT / "configs" / f"{name}.py") + ":smoke",
                         "--workdir", str(tmp_path)]) == 0
    assert (tmp_path / "checkpoints" / "1").exists()


def test_mnist_testbed_config_fits_mnist():
    config = configs.load_config(str(ROOT / "configs" / "mnist_edm.py"))
    configs.check_config(config, num_devices=4)
    net = configs.denoiser_from_config(config).net
    assert (net.img_resolution, net.in_channels, net.label_dim) == (32, 1, 10)
    images, labels = next(data.batch_iterator("mnist", config.train.batch_size))
    assert images.shape == (config.train.batch_size, 32, 32, 1) and labels.max() <= 9


def test_edm_model_on_a_vp_schedule_is_the_same_posterior_mean():
    # data x0 ~ N(0, c^2): D(x; sigma) = c^2 / (c^2 + sigma^2) x in EDM units; on a VP
    # schedule, E[x0 | x_t] = alpha c^2 / (alpha^2 c^2 + sigma^2) x_t
    from difflax import schedules

    c, vp = 0.7, schedules.vp_discrete("scaled_linear", with_t_zero=True)
    fn = wd.edm_model_on(lambda x, sigma: c**2 / (c**2 + sigma[:, None]**2) * x, vp)
    t = np.array([981.0, 501.0, 1.0, 0.0])
    x = np.random.default_rng(0).normal(size=(4, 3))
    alpha, sigma = np.asarray(vp.alpha(t)), np.asarray(vp.sigma(t))
    expected = (alpha * c**2 / (alpha**2 * c**2 + sigma**2))[:, None] * x
    np.testing.assert_allclose(fn(x, t), expected, rtol=1e-5)


def test_paired_sample_fn_gives_every_method_the_same_noise_and_labels():
    sample = lambda params, key, labels: params * jax.random.normal(key, (len(labels), 2))
    fn = wd.paired_sample_fn([(sample, 1.0), (sample, 3.0)], label_dim=10)
    images, labels = fn(jax.random.key(4), 5)
    alone, alone_labels = wd.labelled_sample_fn(sample, 1.0, 10)(jax.random.key(4), 5)
    assert images.shape == (2, 5, 2)
    np.testing.assert_array_equal(labels, alone_labels)
    np.testing.assert_array_equal(images[0], alone)
    np.testing.assert_allclose(images[1], 3.0 * alone, rtol=1e-6)
