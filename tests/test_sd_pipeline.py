"""difflax.pipelines.StableDiffusion against diffusers' StableDiffusionPipeline with a
DDIMScheduler, both built from the same tiny random components saved to a folder."""
import numpy as np
import pytest

from difflax.pipelines import SDScheduler, StableDiffusion, scheduler_from_diffusers
from test_sd import SD1, perturbed, write_tiny_tokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
PROMPTS = ["hello world", "and hello"]


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def folders(request, tmp_path_factory):
    """A tiny diffusers StableDiffusionPipeline (SD 1.x-like for epsilon, SD 2.x-like with
    gelu and v-prediction) saved with save_pretrained."""
    tok_dir = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(tok_dir, "<|endoftext|>" if request.param == "epsilon" else "!")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    text = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16,
        hidden_act="quick_gelu" if request.param == "epsilon" else "gelu")
    pipe = diffusers.StableDiffusionPipeline(
        unet=perturbed(diffusers.UNet2DConditionModel(
            **{**SD1, "use_linear_projection": request.param != "epsilon"}), 1, 0.1),
        vae=perturbed(diffusers.AutoencoderKL(**VAE), 2, 0.1),
        text_encoder=perturbed(transformers.CLIPTextModel(text), 3, 0.1), tokenizer=tokenizer,
        scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER, prediction_type=request.param),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd")
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, folder


def test_generate_matches_diffusers_ddim(folders):
    pipe, folder = folders
    latents = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        want = pipe(PROMPTS, num_inference_steps=4, guidance_scale=7.5, output_type="np",
                    latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())).images
    sd = StableDiffusion.from_pretrained(folder)
    got = sd.generate(PROMPTS, latents=latents, steps=4)
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert np.abs(got - want).max() < 1e-3
    assert want.std() > 0.05  # the images are not flat
    # prompt_embeds path, with the empty prompt's embeddings passed explicitly
    embeds = sd.encode_prompts(PROMPTS)
    again = sd.generate(prompt_embeds=embeds, negative_prompt_embeds=sd.encode_prompts(["", ""]),
                        latents=latents, steps=4)
    np.testing.assert_allclose(again, got, atol=1e-6)


def test_scheduler_grid_is_diffusers_ddim_timesteps():
    for spacing, steps in (("leading", 50), ("leading", 7), ("trailing", 10)):
        ddim = diffusers.DDIMScheduler(**SD_SCHEDULER, timestep_spacing=spacing)
        ddim.set_timesteps(steps)
        grid = SDScheduler(timestep_spacing=spacing).grid(steps)
        np.testing.assert_array_equal(grid[:-1], ddim.timesteps.numpy())
        assert grid[-1] == 0.0
    with pytest.raises(ValueError, match="uneven"):
        SDScheduler(timestep_spacing="trailing").grid(3)
    with pytest.raises(ValueError, match=r"timestep_spacing='linspace'.*leading"):
        scheduler_from_diffusers({"timestep_spacing": "linspace"})
    with pytest.raises(ValueError, match="clip_sample=True"):
        scheduler_from_diffusers({"clip_sample": True})
