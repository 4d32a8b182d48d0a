"""Stable Diffusion's UNet, CLIP text encoder and tokenizer against diffusers' / transformers'
PyTorch modules, on tiny random configs saved to temporary folders."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax.models import load_clip_text_encoder, load_sd_unet, sd_skip_connections
from difflax.models.sd_unet_weights import sd_unet_config_from_diffusers
from sd_folders import SD1, perturbed, write_tiny_tokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SD2 = dict(sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=2,
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
           cross_attention_dim=24, attention_head_dim=[2, 4, 4], norm_num_groups=8,
           use_linear_projection=True, upcast_attention=True)
# SDXL-like: no attention at full resolution, 2 transformer layers, text_time embedding
SDXL = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
            attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2], norm_num_groups=8,
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8)
CONFIGS = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}


def max_rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)


def unet_reference(tmp_path_factory, kwargs):
    """The diffusers UNet for `kwargs` with perturbed weights, saved to a folder, and its
    output on fixed inputs (NHWC)."""
    torch.manual_seed(0)
    model = perturbed(diffusers.UNet2DConditionModel(**kwargs))
    folder = tmp_path_factory.mktemp("unet")
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    timesteps = np.array([3.0, 801.0], np.float32)
    context = rng.normal(size=(2, 5, kwargs["cross_attention_dim"])).astype(np.float32)
    added = {}
    if kwargs.get("addition_embed_type") == "text_time":  # SDXL: pooled text, 6 size ids
        added = dict(text_embeds=rng.normal(size=(2, 12)).astype(np.float32),
                     time_ids=np.array([[16, 16, 0, 0, 16, 16], [24, 8, 2, 4, 16, 16]], np.float32))
    torch_added = {k: torch.from_numpy(v) for k, v in added.items()}
    with torch.no_grad():
        out = model(nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context),
                    added_cond_kwargs=torch_added or None).sample
    return dict(model=model, folder=folder, latents=latents, timesteps=timesteps,
                context=context, added=added, torch_added=torch_added or None, out=nhwc(out))


@pytest.fixture(scope="module", params=list(CONFIGS))
def unet_ref(request, tmp_path_factory):
    ref = unet_reference(tmp_path_factory, CONFIGS[request.param])
    unet, variables = load_sd_unet(ref["folder"])
    ref.update(unet=unet, variables=variables,
               apply=jax.jit(lambda v, x, t, c, s: unet.apply(v, x, t, c, skip_scales=s,
                                                               **ref["added"])))
    return ref


def test_sd_unet_matches_diffusers(unet_ref):
    ref = unet_ref
    n = len(sd_skip_connections(ref["unet"].config))
    out = ref["apply"](ref["variables"], ref["latents"], ref["timesteps"], ref["context"],
                       jnp.ones(n))
    assert out.shape == ref["out"].shape
    assert max_rel_err(out, ref["out"]) < 1e-4
    plain = ref["unet"].apply(ref["variables"], ref["latents"], ref["timesteps"], ref["context"],
                              **ref["added"])
    np.testing.assert_allclose(plain, out, rtol=1e-5, atol=1e-5)  # ones == no scales
    if ref["added"]:
        with pytest.raises(ValueError, match="text_embeds= and time_ids="):
            ref["unet"].apply(ref["variables"], ref["latents"], ref["timesteps"], ref["context"])
    with pytest.raises(ValueError, match=r"\(7, 7\).*divisible by"):
        ref["unet"].apply(ref["variables"], ref["latents"][:, :7, :7], ref["timesteps"],
                          ref["context"])


def test_sd_unet_skip_scales_match_scaled_skips_in_diffusers(unet_ref):
    """A skip scale s_k equals adding (s_k - 1) * skip_k to that skip in diffusers (its
    ControlNet residual inputs; zero for the mid block), with the skips captured by forward
    hooks."""
    ref, model = unet_ref, unet_ref["model"]
    skips = []
    hooks = [model.conv_in.register_forward_hook(lambda m, i, o: skips.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: skips.extend(o[1]))
              for b in model.down_blocks]
    args = nchw(ref["latents"]), torch.from_numpy(ref["timesteps"]), torch.from_numpy(ref["context"])
    with torch.no_grad():
        model(*args, added_cond_kwargs=ref["torch_added"])
    for h in hooks:
        h.remove()
    connections = sd_skip_connections(ref["unet"].config)
    assert [tuple(s.shape[1:3]) for s in skips] == [(c.channels, c.resolution)
                                                    for c in connections]
    scales = np.linspace(0.6, 1.3, len(skips)).astype(np.float32)
    extra = tuple((float(s) - 1.0) * t for s, t in zip(scales, skips))
    with torch.no_grad():
        want = model(*args, added_cond_kwargs=ref["torch_added"],
                     down_block_additional_residuals=extra,
                     mid_block_additional_residual=torch.zeros_like(skips[-1])).sample
    out = ref["apply"](ref["variables"], ref["latents"], ref["timesteps"], ref["context"],
                       jnp.asarray(scales))
    assert max_rel_err(out, nhwc(want)) < 1e-4
    assert max_rel_err(out, ref["out"]) > 1e-2  # the scales matter


def test_sd_unet_skip_scales_are_data(unet_ref):
    """vmap over a stack of scale settings is one call and equals each setting alone."""
    ref = unet_ref
    if ref["added"] or ref["unet"].config.use_linear_projection:
        pytest.skip("one config is enough")
    n = len(sd_skip_connections(ref["unet"].config))
    stack = jnp.stack([jnp.ones(n), jnp.linspace(0.5, 1.5, n)])
    both = jax.vmap(lambda s: ref["apply"](ref["variables"], ref["latents"], ref["timesteps"],
                                           ref["context"], s))(stack)
    for setting, out in zip(stack, both):
        one = ref["apply"](ref["variables"], ref["latents"], ref["timesteps"], ref["context"],
                           setting)
        np.testing.assert_allclose(out, one, rtol=1e-4, atol=1e-5)


def test_sd_unet_config_errors():
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D.*CrossAttnDownBlock2D"):
        sd_unet_config_from_diffusers({**SD1, "down_block_types": ["SimpleCrossAttnDownBlock2D",
                                                                   "DownBlock2D"]})
    with pytest.raises(ValueError, match="addition_embed_type entry 'text'.*text_time"):
        sd_unet_config_from_diffusers({**SD1, "addition_embed_type": "text"})
    with pytest.raises(ValueError, match="mid_block_type entry 'UNetMidBlock2D'"):
        sd_unet_config_from_diffusers({**SD1, "mid_block_type": "UNetMidBlock2D"})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_sd_unet("/nonexistent/unet")


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_text_encoder_matches_transformers(act, tmp_path):
    config = transformers.CLIPTextConfig(
        vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=12, hidden_act=act,
        bos_token_id=48, eos_token_id=49, pad_token_id=49)
    torch.manual_seed(0)
    model = perturbed(transformers.CLIPTextModel(config))
    model.save_pretrained(tmp_path, safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, 50, (3, 12))
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    text, variables = load_clip_text_encoder(tmp_path)
    hidden = text.apply(variables, ids)
    assert hidden.shape == (3, 12, 32)
    assert max_rel_err(hidden, want) < 1e-4
    with pytest.raises(ValueError, match="max_position_embeddings=12"):
        text.apply(variables, np.zeros((1, 13), np.int32))
    if act == "gelu":  # older folders (the Hub's SD checkpoints): text_model. names, position_ids
        from safetensors.numpy import load_file, save_file

        old = tmp_path / "old"
        old.mkdir()
        (old / "config.json").write_text((tmp_path / "config.json").read_text())
        state = {f"text_model.{k}": v for k, v in load_file(tmp_path / "model.safetensors").items()}
        state["text_model.embeddings.position_ids"] = np.arange(12)[None]
        save_file(state, old / "model.safetensors")
        text, variables = load_clip_text_encoder(old)
        np.testing.assert_array_equal(text.apply(variables, ids), hidden)


def test_clip_text_encoder_rejects_unknown_activation(tmp_path):
    from difflax.models.clip import clip_text_config_from_transformers

    with pytest.raises(ValueError, match="hidden_act='relu'.*gelu"):
        clip_text_config_from_transformers({"hidden_act": "relu"})


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_clip_tokenizer_matches_transformers(pad_token, tmp_path):
    from difflax.models import load_clip_tokenizer

    write_tiny_tokenizer(tmp_path, pad_token)
    prompts = ["Hello  World!", "hello and the world's 42 \u00e9t\u00e9s", "",
               "hello world " * 10]  # the last is truncated
    want = transformers.CLIPTokenizer.from_pretrained(tmp_path)(
        prompts, padding="max_length", max_length=16, truncation=True).input_ids
    got = load_clip_tokenizer(tmp_path)(prompts)
    assert got.shape == (4, 16) and got.dtype == np.int32
    np.testing.assert_array_equal(got, np.array(want))
    assert len(set(got[0])) > 4  # merges applied: hello</w>, world</w>, !, specials


def test_clip_tokenizer_missing_files(tmp_path):
    from difflax.models import load_clip_tokenizer

    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_clip_tokenizer(tmp_path)


def test_clip_tokenizer_reads_tokenizer_json(tmp_path):
    """transformers 5 saves a tokenizer folder as tokenizer.json, without vocab.json."""
    from difflax.models import load_clip_tokenizer

    (tmp_path / "src").mkdir()
    write_tiny_tokenizer(tmp_path / "src", "!")
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path / "src")
    reference.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "vocab.json").exists()
    prompts = ["Hello, world! and hello"]
    want = reference(prompts, padding="max_length", max_length=16, truncation=True).input_ids
    np.testing.assert_array_equal(load_clip_tokenizer(tmp_path / "saved")(prompts), want)
