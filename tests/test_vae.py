"""Stable Diffusion's autoencoder: difflax.models.vae against diffusers' PyTorch AutoencoderKL."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax.models import VAEConfig, load_vae, save_vae
from difflax.models.vae import scale_latents, unscale_latents

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
            latent_channels=4, scaling_factor=0.5,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def max_rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL, its weights moved away from their initial values
    (so that GroupNorm scales/biases and every conv matter), saved as a diffusers folder."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)  # config.json + diffusion_pytorch_model.safetensors
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    latents = np.random.default_rng(1).normal(size=(2, 4, 4, 4)).astype(np.float32)
    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2))
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    with torch.no_grad():
        posterior = model.encode(nchw(images)).latent_dist
        decoded = model.decode(nchw(latents)).sample
    return dict(model=model, folder=folder, images=images, latents=latents,
                mean=nhwc(posterior.mean), logvar=nhwc(posterior.logvar), decoded=nhwc(decoded))


def check_matches(folder, ref):
    vae, variables = load_vae(folder)
    mean, logvar = jax.jit(lambda x: vae.apply(variables, x, method="encode"))(ref["images"])
    decoded = jax.jit(lambda z: vae.apply(variables, z, method="decode"))(ref["latents"])
    assert mean.shape == ref["mean"].shape and decoded.shape == ref["decoded"].shape
    assert max_rel_err(mean, ref["mean"]) < 1e-4
    assert max_rel_err(logvar, ref["logvar"]) < 1e-4
    assert max_rel_err(decoded, ref["decoded"]) < 1e-4
    return vae, variables


def test_load_vae_matches_diffusers(reference):
    vae, variables = check_matches(reference["folder"], reference)
    assert vae.config.scaling_factor == 0.5 and vae.config.block_out_channels == (8, 16, 16)
    # the scaling lives in encode_latents / decode_latents only
    z = vae.apply(variables, reference["images"], method="encode_latents")
    np.testing.assert_allclose(z, 0.5 * reference["mean"], rtol=1e-4, atol=1e-5)
    images = vae.apply(variables, 0.5 * reference["latents"], method="decode_latents")
    assert max_rel_err(images, reference["decoded"]) < 1e-4


def test_load_vae_reads_deprecated_attention_names(reference, tmp_path):
    """SD 1.x vae folders name the attention query/key/value/proj_attn (some as 1x1 convs)."""
    from safetensors.numpy import save_file

    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for name, value in reference["model"].state_dict().items():
        value = value.numpy()
        for new, old in renames.items():
            if f".attentions.0.{new}." in name:
                name = name.replace(f".{new}.", f".{old}.")
                if old == "key" and value.ndim == 2:
                    value = value[:, :, None, None]  # the LDM checkpoint's 1x1 conv form
        state[name] = np.ascontiguousarray(value)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((reference["folder"] / "config.json").read_text())
    check_matches(tmp_path, reference)


def test_save_vae_writes_the_folder_diffusers_reads(reference, tmp_path):
    vae, variables = load_vae(reference["folder"])
    save_vae(tmp_path, vae.config, variables)
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path).state_dict()
    original = reference["model"].state_dict()
    assert sorted(reloaded) == sorted(original)   # diffusers' names, none missing or extra
    for name, value in original.items():
        np.testing.assert_array_equal(reloaded[name].numpy(), value.numpy(), err_msg=name)
    assert load_vae(tmp_path)[0].config == vae.config


def test_posterior_sample_moments():
    """scale_latents with noise samples (z - shift) * scale, z ~ N(mean, exp(logvar))."""
    config = VAEConfig(scaling_factor=0.5, shift_factor=1.0)
    mean, logvar = jnp.full((2,), 3.0), jnp.log(jnp.array([0.25, 4.0]))
    noise = jax.random.normal(jax.random.key(0), (20000, 2))
    z = scale_latents(config, mean, logvar, noise)
    # mean 0.5 * (3 - 1) = 1; std 0.5 * (0.5, 2); standard errors 0.002 / 0.007
    np.testing.assert_allclose(z.mean(0), [1.0, 1.0], atol=0.03)
    np.testing.assert_allclose(z.std(0), [0.25, 1.0], rtol=0.03)
    np.testing.assert_allclose(unscale_latents(config, scale_latents(config, mean)), mean)


def test_load_vae_errors(reference, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(tmp_path / "missing")
    config = json.loads((reference["folder"] / "config.json").read_text())
    cases = [({"act_fn": "relu"}, "unsupported AutoencoderKL act_fn='relu'"),
             ({"_class_name": "UNet2DModel"}, "not 'AutoencoderKL'"),
             ({"typo_channels": 3}, "unknown AutoencoderKL config key"),
             ({"block_out_channels": [8, 16, 32]}, "do not fit this AutoencoderKL")]
    for i, (change, message) in enumerate(cases):
        folder = tmp_path / f"config{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        (folder / "diffusion_pytorch_model.safetensors").symlink_to(
            reference["folder"] / "diffusion_pytorch_model.safetensors")
        with pytest.raises(ValueError, match=message):
            load_vae(folder)
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"expected one \*.safetensors"):
        load_vae(empty)
