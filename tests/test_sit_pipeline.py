"""Pretrained SiT weights (a willisma/SiT `.pt`) + a diffusers VAE folder -> images, through
`difflax.pipelines.SiTPipeline` and `difflax sample --sit`."""
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from difflax import cli
from difflax.images import make_grid
from difflax.interpolants import get_sit_fn, sample_ode
from difflax.models import load_vae
from difflax.models.sit_weights import load_sit
from difflax.pipelines import SiTPipeline
from sd_folders import SIT_ARCH, SIT_GOLDEN, save_sit_checkpoint, save_tiny_vae

pytest.importorskip("torch")
pytest.importorskip("diffusers")

# SIT_ARCH as flags of `difflax sample --sit`
TINY_FLAGS = ["--sit-model", SIT_ARCH["model"], "--image-size", str(SIT_ARCH["image_size"]),
              *(f"--sit.{k}={v}" for k, v in SIT_ARCH.items() if k not in ("model", "image_size"))]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(SiT state dict .pt, as torch.save writes SiT's checkpoints; a tiny random diffusers
    VAE folder with 4 latent channels, 2x down-sampling)."""
    root = tmp_path_factory.mktemp("pretrained_sit")
    save_sit_checkpoint(root / "sit.pt")
    save_tiny_vae(root / "vae", latent_channels=4)
    return str(root / "sit.pt"), str(root / "vae")


@pytest.fixture(scope="module")
def pipe(files):
    return SiTPipeline.from_pretrained(*files, **SIT_ARCH)


def test_pipeline_is_sits_guided_ode_then_the_unscaled_decoder(pipe, files):
    classes = [1, 3, 7]
    images, latents = pipe.generate(classes, cfg_scale=4.0, method="heun", steps=2, seed=5)
    # by hand: the .npz of the same weights, SiT's guided ODE (2 Heun steps), decode(z / scale)
    model, variables = load_sit(SIT_GOLDEN)
    noise = pipe.initial_latents(5, 3)
    fn = get_sit_fn(model, variables, y=jnp.array(classes), cfg_scale=4.0)
    z, nfe = sample_ode(fn, noise, method="heun", steps=2)
    np.testing.assert_allclose(latents, z, atol=1e-5)
    vae, vae_vars = load_vae(files[1])
    decoded = vae.apply(vae_vars, z / vae.config.scaling_factor, method="decode")
    np.testing.assert_allclose(images, np.clip(decoded / 2 + 0.5, 0, 1), atol=1e-5)
    assert images.shape == (3, 16, 16, 3) and nfe == pipe.nfe("heun", 2) == 4
    assert images.std(axis=0).mean() > 1e-3


def test_guidance_acts_on_the_first_three_latent_channels(pipe):
    # one Euler step from the same noise: x + h v, v guided on channels 0-2 only (SiT's
    # forward_with_cfg), so the 4th channel equals the unguided sample's
    guided = pipe.generate([2, 4], cfg_scale=4.0, method="euler", steps=1)[1]
    plain = pipe.generate([2, 4], cfg_scale=1.0, method="euler", steps=1)[1]
    np.testing.assert_allclose(guided[..., 3], plain[..., 3], atol=1e-6)
    assert np.abs(guided[..., :3] - plain[..., :3]).max() > 1e-3


def test_cli_writes_the_pipelines_images(pipe, files, tmp_path, capsys):
    sit, vae = files
    out = str(tmp_path / "grid")
    assert cli.main(["sample", "--sit", sit, "--vae", vae, *TINY_FLAGS, "--classes", "1,3,7",
                     "--num", "4", "--sampler", "heun", "--steps", "2", "--seed", "5",
                     "--out", out]) == 0
    assert "| heun    | 4   | 4         | 4      |" in capsys.readouterr().out
    images, latents = pipe.generate([1, 3, 7, 1], cfg_scale=4.0, method="heun", steps=2, seed=5)
    saved = np.load(out + ".npz")
    np.testing.assert_array_equal(saved["labels"], [1, 3, 7, 1])  # cycled to --num
    np.testing.assert_allclose(saved["latents"], latents, atol=1e-6)
    np.testing.assert_allclose(saved["images"], images * 2 - 1, atol=1e-6)
    png = np.asarray(Image.open(out + ".png"))  # one class per column, 16 px enlarged 4x
    np.testing.assert_array_equal(png, make_grid(saved["images"], nrow=3).repeat(4, 0).repeat(4, 1))


@pytest.mark.parametrize("flags, message", [
    (["--sit", "missing.pt"], "no SiT weights at missing.pt"),
    (["--sit-model", "SiT-XXL/2"], "unknown SiT preset 'SiT-XXL/2'; valid choices: SiT-S/2, "
     "SiT-S/4"),
    (["--sit.dept=3"], "unknown config key 'dept' (did you mean 'depth'?)"),
    (["--sit.depth=3"], "missing ['blocks_2/"),   # weights of another architecture
    (["--sit", str(SIT_GOLDEN.parent / "README.md")], "unknown weights format"),
    (["--sit", "GARBAGE"], "is not a PyTorch state dict"),
    (["--vae", ""], "--sit needs --vae FOLDER"),
    (["--classes", "3,10"], "give one or more labels in [0, 9]"),
    (["--classes", "cat"], "--classes 'cat': comma-separated integers"),
])
def test_bad_input_is_one_clear_line(files, tmp_path, capsys, flags, message):
    sit, vae = files
    if "GARBAGE" in flags:
        (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
        flags = ["--sit", str(tmp_path / "garbage.pt")]
    args = ["sample", "--sit", sit, "--vae", vae, *TINY_FLAGS, "--out", str(tmp_path / "g")]
    code = cli.main(args + flags)  # argparse: the last --sit / --vae given wins
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_bfloat16_is_close_to_float32(pipe):
    """dtype="bfloat16": the SiT's blocks and the VAE decoder in bfloat16, the ODE's state
    float32; the images move, but by far less than the image range."""
    ref = pipe.generate([1, 3], cfg_scale=4.0, method="heun", steps=2, seed=5)
    low = pipe.generate([1, 3], cfg_scale=4.0, method="heun", steps=2, seed=5, dtype="bfloat16")
    assert low[0].dtype == np.float32 and low[1].dtype == np.float32
    diff = np.abs(low[0] - ref[0])
    assert 0 < diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())
    with pytest.raises(ValueError, match="valid choices: 'float32', 'bfloat16'"):
        pipe.generate([1], dtype="float16")
