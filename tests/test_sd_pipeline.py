"""difflax.pipelines.StableDiffusion against diffusers' StableDiffusionPipeline (DDIM,
DPM-Solver++ and UniPC schedulers), all built from the same tiny random components saved to a
folder; compilation, sharding over the 4 forced CPU devices, bfloat16, seeds, and
`difflax generate`."""
import jax
import numpy as np
import pytest

from difflax import cli
from difflax.images import make_grid
from difflax.pipelines import SDScheduler, StableDiffusion, scheduler_from_diffusers
from difflax.mesh import make_mesh
from sd_folders import save_tiny_pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["hello world", "and hello"]
THREE = ["hello world", "and hello", "world"]  # 3 images: padded to the 4 devices


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def folders(request, tmp_path_factory):
    """(diffusers pipeline, its folder, a StableDiffusion on the 4-device mesh); SD 1.x-like
    for epsilon, SD 2.x-like for v-prediction."""
    folder = tmp_path_factory.mktemp("sd")
    pipe = save_tiny_pipeline(folder, request.param)
    return pipe, folder, StableDiffusion.from_pretrained(folder)


@pytest.fixture(scope="module")
def sd1x(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1x")
    return save_tiny_pipeline(folder, "epsilon"), folder, StableDiffusion.from_pretrained(folder)


def start_latents(batch=2):
    return np.random.default_rng(0).normal(size=(batch, 8, 8, 4)).astype(np.float32)


def diffusers_images(pipe, scheduler, latents, steps):
    pipe = diffusers.StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler},
                                             requires_safety_checker=False)
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                    latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())).images


def test_generate_matches_diffusers_ddim(folders):
    pipe, _, sd = folders
    latents = start_latents()
    want = diffusers_images(pipe, pipe.scheduler, latents, 4)
    got = sd.generate(PROMPTS, latents=latents, steps=4)
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert np.abs(got - want).max() < 1e-3
    assert want.std() > 0.05  # the images are not flat
    # prompt_embeds path, with the empty prompt's embeddings passed explicitly
    embeds = sd.encode_prompts(PROMPTS)
    again = sd.generate(prompt_embeds=embeds, negative_prompt_embeds=sd.encode_prompts(["", ""]),
                        latents=latents, steps=4)
    np.testing.assert_allclose(again, got, atol=1e-6)


@pytest.mark.parametrize("sampler, scheduler, steps", [
    ("dpmpp_2m", "DPMSolverMultistepScheduler", 4), ("unipc", "UniPCMultistepScheduler", 5)])
def test_multistep_samplers_match_diffusers(sd1x, sampler, scheduler, steps):
    """difflax's DPM-Solver++(2M) / UniPC on the grid of diffusers' scheduler (its timesteps,
    then sigma = 0) equal diffusers' pipeline with that scheduler, read from the folder's
    scheduler_config.json (a DDIMScheduler's, "leading" spacing)."""
    pipe, folder, sd = sd1x
    latents = start_latents()
    want = diffusers_images(pipe, getattr(diffusers, scheduler).from_pretrained(
        folder, subfolder="scheduler"), latents, steps)
    got = sd.generate(PROMPTS, latents=latents, steps=steps, sampler=sampler)
    assert np.abs(got - want).max() < 1e-3
    ddim = sd.generate(PROMPTS, latents=latents, steps=4)
    assert np.abs(got - ddim).max() > 1e-2  # another sampler, other images


class CountingVAE:
    """The VAE with a Python side effect in `apply`: counts the traces of the sampling jit."""

    def __init__(self, vae):
        self.vae, self.calls = vae, 0

    def apply(self, *args, **kwargs):
        self.calls += 1
        return self.vae.apply(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.vae, name)


def test_one_trace_per_signature_and_seeds(sd1x, monkeypatch):
    """Other prompts, seeds and guidance scales reuse the compiled sampler; the same seed gives
    the same images, another seed others; image i depends only on (seed, i)."""
    _, _, sd = sd1x
    counting = CountingVAE(sd.vae)
    monkeypatch.setattr(sd, "vae", counting)
    first = sd.generate(THREE, steps=3, sampler="deis_tab", seed=1)
    assert counting.calls == 1
    other = sd.generate(["world", "hello", "and"], steps=3, sampler="deis_tab", seed=2,
                        guidance_scale=5.0)
    again = sd.generate(THREE, steps=3, sampler="deis_tab", seed=1)
    two = sd.generate(THREE[:2], steps=3, sampler="deis_tab", seed=1)  # padded to 4 as well
    assert counting.calls == 1
    np.testing.assert_array_equal(again, first)
    np.testing.assert_allclose(two, first[:2], atol=1e-6)
    assert np.abs(other - first).max() > 0.05 and np.isfinite(first).all()
    np.testing.assert_array_equal(sd.initial_latents(1, 3)[:2], sd.initial_latents(1, 2))


def test_sharded_equals_one_device(sd1x):
    """3 images on the 4-device mesh (padded to 4) equal the same images on one device."""
    _, folder, sd = sd1x
    assert sd.mesh.size == 4
    single = StableDiffusion.from_pretrained(folder, mesh=make_mesh(jax.devices()[:1]))
    want = single.generate(THREE, steps=3, sampler="deis_tab", seed=1)
    got = sd.generate(THREE, steps=3, sampler="deis_tab", seed=1)
    assert got.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bfloat16_close_to_float32(sd1x):
    """UNet and VAE in bfloat16 (float32 parameters cast in the jit). Measured on this tiny
    random model (DDIM, 4 steps, guidance 7.5, which amplifies the UNet's bfloat16 error about
    4x): |diff| of the [0, 1] images max 0.063, mean 0.011 (without guidance 0.017, 0.0026);
    bounds 0.2 and 0.04. The parameters stay float32."""
    _, _, sd = sd1x
    latents = start_latents()
    f32 = sd.generate(PROMPTS, latents=latents, steps=4)
    bf16 = sd.generate(PROMPTS, latents=latents, steps=4, dtype="bfloat16")
    diff = np.abs(bf16 - f32)
    assert 1e-3 < diff.max() < 0.2 and diff.mean() < 0.04, (diff.max(), diff.mean())
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(sd.unet_vars))


def test_plans_and_skip_scales_in_generate(sd1x):
    """`plan=` runs the feature-reuse plans of difflax.accel on the pipeline's UNet: the full
    plan is the plain sampler, DeepCache (a full step every 2 of 4) changes the images a little;
    Skip-Tuning scales of 1 are the plain sampler, 0.8 on every skip changes the images."""
    from difflax.accel import deepcache_plan, full_plan, linear_skip_scales

    _, _, sd = sd1x
    latents = start_latents()
    plain = sd.generate(PROMPTS, latents=latents, steps=4)
    full = sd.generate(PROMPTS, latents=latents, steps=4, plan=full_plan(4))
    np.testing.assert_allclose(full, plain, atol=1e-5)
    cached = sd.generate(PROMPTS, latents=latents, steps=4,
                         plan=deepcache_plan(sd.unet, 4, branch=1, interval=2))
    assert 1e-4 < np.abs(cached - plain).max() and np.abs(cached - plain).mean() < 0.2
    ones = sd.generate(PROMPTS, latents=latents, steps=4,
                       skip_scales=linear_skip_scales(sd.unet.config, 1.0, 1.0))
    np.testing.assert_allclose(ones, plain, atol=1e-5)
    scaled = sd.generate(PROMPTS, latents=latents, steps=4,
                         skip_scales=linear_skip_scales(sd.unet.config, 0.8, 0.8))
    assert np.abs(scaled - plain).max() > 1e-3


def test_bad_sampler_or_dtype_names_the_choices(sd1x):
    _, _, sd = sd1x
    with pytest.raises(ValueError, match=r"unknown sampler 'dpm\+\+'.*'ddim'.*'unipc'"):
        sd.generate(PROMPTS, sampler="dpm++")
    with pytest.raises(ValueError, match=r"unknown dtype 'float16'.*'float32', 'bfloat16'"):
        sd.generate(PROMPTS, dtype="float16")


def test_cli_generate_writes_png_grid(sd1x, tmp_path, capsys):
    _, folder, sd = sd1x
    out = tmp_path / "cats.png"
    assert cli.main(["generate", "--model", str(folder), "--prompt", "hello world", "--num", "3",
                     "--sampler", "deis_tab", "--steps", "3", "--seed", "1",
                     "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| deis_tab " in table and str(out) in table
    from PIL import Image

    png = np.asarray(Image.open(out))
    want = sd.generate(["hello world"] * 3, steps=3, sampler="deis_tab", seed=1)
    grid = make_grid(want * 2 - 1, nrow=2).repeat(4, axis=0).repeat(4, axis=1)
    assert png.shape == grid.shape
    assert np.abs(png.astype(int) - grid).max() <= 1  # rounding of values within 1e-5
    assert cli.main(["generate", "--model", str(folder), "--prompt", "x", "--sampler", "heun",
                     "--out", str(out)]) == 2
    assert "unknown sampler 'heun'" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(folder), "--prompt", "x", "--plan", "deepcache",
                     "--out", str(out)]) == 2
    assert "unknown --plan 'deepcache'; valid: none, faster_diffusion" in capsys.readouterr().err
    from difflax.accel import deepcache_plan

    assert cli.main(["generate", "--model", str(folder), "--prompt", "hello world", "--steps", "3",
                     "--sampler", "deis_tab", "--plan", "deepcache:2", "--out", str(out)]) == 0
    assert "| deepcache:2 " in capsys.readouterr().out
    want = sd.generate(["hello world"], steps=3, sampler="deis_tab",
                       plan=deepcache_plan(sd.unet, 3, branch=1, interval=2))
    png = np.asarray(Image.open(out)).astype(int)
    assert np.abs(png - make_grid(want * 2 - 1, nrow=1).repeat(4, 0).repeat(4, 1)).max() <= 1


# SD 1.5's scheduler/scheduler_config.json: no timestep_spacing, so each scheduler class's
# from_config uses its default (DDIM / PNDM "leading", DPM-Solver / UniPC "linspace")
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None}


def test_scheduler_grids_are_diffusers_timesteps():
    for spacing, steps in ((None, 50), (None, 4), ("leading", 7), ("trailing", 10),
                           ("linspace", 6)):
        config = SD15_SCHEDULER if spacing is None else {**SD15_SCHEDULER,
                                                         "timestep_spacing": spacing}
        scheduler = scheduler_from_diffusers(config)
        if spacing != "linspace":
            ddim = diffusers.DDIMScheduler.from_config(config)
            ddim.set_timesteps(steps)
            grid = scheduler.grid(steps)
            np.testing.assert_array_equal(grid[:-1], ddim.timesteps.numpy())
            assert grid[-1] == 0.0
        for name, cls in (("dpmpp_2m", diffusers.DPMSolverMultistepScheduler),
                          ("unipc", diffusers.UniPCMultistepScheduler)):
            multistep = cls.from_config(config)
            multistep.set_timesteps(steps)
            grid = scheduler.grid(steps, name)
            np.testing.assert_array_equal(grid[:-1], multistep.timesteps.numpy())
            assert grid[-1] == -1.0 and multistep.sigmas[-1] == 0  # sigma = 0 at t = -1
    np.testing.assert_array_equal(SDScheduler().grid(4, "unipc"), [999, 749, 500, 250, -1])
    with pytest.raises(ValueError, match="uneven"):
        SDScheduler(timestep_spacing="trailing").grid(3)
    with pytest.raises(ValueError, match="'ddim'.*not 'linspace'"):
        SDScheduler(timestep_spacing="linspace").grid(4)
    with pytest.raises(ValueError, match="repeat timesteps"):
        SDScheduler().grid(1000, "unipc")
    with pytest.raises(ValueError, match=r"timestep_spacing='even'.*leading"):
        scheduler_from_diffusers({"timestep_spacing": "even"})
    with pytest.raises(ValueError, match="clip_sample=True"):
        scheduler_from_diffusers({"clip_sample": True})
    with pytest.raises(ValueError, match=r"use_karras_sigmas=True; supported: \[False\]"):
        scheduler_from_diffusers({"use_karras_sigmas": True})
    with pytest.raises(ValueError, match=r"final_sigmas_type='sigma_min'; supported: \['zero'\]"):
        scheduler_from_diffusers({"final_sigmas_type": "sigma_min"})
    # a folder saved with DPMSolverMultistepScheduler's defaults loads (its spacing explicit)
    dpm = dict(diffusers.DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER).config)
    assert scheduler_from_diffusers(dpm) == SDScheduler(timestep_spacing="linspace")
