"""Tiny random Stable Diffusion components for the tests: a UNet config, weights moved off
their initial values, a CLIP tokenizer folder, and a whole diffusers pipeline folder; and a
tiny SiT checkpoint for that latent space."""
import json
import pathlib
import tempfile

SD1 = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
           attention_head_dim=2, norm_num_groups=8, use_linear_projection=False)
VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
# tests/data/sit_small.npz (willisma/SiT's network, random weights: 8x8x4 latents, patch 2,
# hidden 48, depth 2, 4 heads, 10 classes + null, learn_sigma) as a preset with its fields
# overridden, at 16 px through `save_tiny_vae(..., latent_channels=4)`'s 2x down-sampling
SIT_GOLDEN = pathlib.Path(__file__).resolve().parent / "data" / "sit_small.npz"
SIT_ARCH = dict(model="SiT-S/2", image_size=16, hidden_size=48, depth=2, num_heads=4,
                num_classes=10)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def perturbed(model, seed=1, scale=0.2):
    """Moves every weight away from its initial value (zero-initialised output layers, unit
    norms), so that every parameter matters in the comparison."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def save_tiny_vae(folder, latent_channels=2):
    """A tiny random diffusers AutoencoderKL (2 levels of 4 and 8 channels: 2x down-sampling
    to `latent_channels` latent channels), weights moved off their initial values (torch
    seed 0), saved to `folder` with save_pretrained; returns the model."""
    import diffusers
    import torch

    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(block_out_channels=(4, 8), layers_per_block=1,
                                    norm_num_groups=2, latent_channels=latent_channels,
                                    down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def save_sit_checkpoint(path):
    """SIT_GOLDEN's weights as the state dict `.pt` that torch.save writes, under willisma/
    SiT's parameter names (as its released SiT-XL-2-256x256.pt)."""
    import numpy as np
    import torch

    with np.load(SIT_GOLDEN) as f:
        torch.save({k.removeprefix("param/"): torch.from_numpy(f[k]) for k in f.files
                    if k.startswith("param/")}, path)


def write_tiny_tokenizer(folder, pad_token):
    """A CLIP tokenizer folder with the 256 byte symbols (alone and word-final) and a few
    merges, in the files of an SD checkpoint's tokenizer/ folder."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    merges = ["h e", "l l", "he ll", "hell o</w>", "w o", "r l", "rl d</w>", "wo rld</w>",
              "a n", "an d</w>"]
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 16, "pad_token": pad_token, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))


def save_tiny_pipeline(folder, prediction_type="epsilon"):
    """A tiny diffusers StableDiffusionPipeline (SD 1.x-like for "epsilon", SD 2.x-like with
    gelu, linear projections and pad token "!" for "v_prediction") with a DDIMScheduler, saved
    to `folder` with save_pretrained; returns the pipeline."""
    import diffusers
    import torch
    import transformers

    sd1 = prediction_type == "epsilon"
    with tempfile.TemporaryDirectory() as source:
        write_tiny_tokenizer(pathlib.Path(source), "<|endoftext|>" if sd1 else "!")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    text = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16,
        hidden_act="quick_gelu" if sd1 else "gelu")
    pipe = diffusers.StableDiffusionPipeline(
        unet=perturbed(diffusers.UNet2DConditionModel(**{**SD1, "use_linear_projection": not sd1}),
                       1, 0.1),
        vae=perturbed(diffusers.AutoencoderKL(**VAE), 2, 0.1),
        text_encoder=perturbed(transformers.CLIPTextModel(text), 3, 0.1), tokenizer=tokenizer,
        scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe
