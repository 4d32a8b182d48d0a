"""Defaults that every config overrides: data, model, training, sampling, evaluation.

Each section is turned into typed objects once, by the CLI (difflax/configs.py):
`model` -> difflax.models.UNetConfig + Denoiser fields (or SiTConfig), `train` -> TrainConfig.
Variant "" holds the defaults of a UNet run on images, variant "sit" those of a SiT run on
stored latents (`model.kind = "sit"`; a config without `model.kind` is a UNet run).
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant == "sit":
        return sit_config()
    if variant:
        raise ValueError(f"unknown variant {variant!r} of default; valid: '', 'sit'")
    c = ml_collections.ConfigDict()
    c.data = dict(name="digits", resolution=16, random_flip=False, data_dir="")
    c.model = dict(
        precond="edm", sigma_data=0.5, model_type="SongUNet", model_channels=32,
        channel_mult=(1, 2, 2), channel_mult_emb=4, num_blocks=2, attn_resolutions=(8,),
        dropout=0.0, label_dropout=0.0, embedding_type="positional", channel_mult_noise=1,
        encoder_type="standard", decoder_type="standard", resample_filter=(1, 1),
        conditional=True)
    c.train = dict(
        steps=1000, batch_size=64, lr=1e-3, warmup_steps=100, weight_decay=0.0, grad_clip=0.0,
        ema_halflife_kimg=500.0, ema_rampup_ratio=0.05, ema_decay=None, log_every=50,
        ckpt_every=500, keep_checkpoints=3, sample_every=0, seed=0, tensorboard=False,
        wandb="", compute_dtype="float32")
    # What `difflax sample` uses by default: EDM's deterministic Heun sampler (Algorithm 1).
    c.sample = dict(sampler="edm_heun", steps=18, num=64, sigma_min=0.002, sigma_max=80.0,
                    seed=1)
    # What `difflax evaluate` runs by default: (sampler, steps) pairs and the sample count.
    c.evaluate = dict(samplers=("edm_heun:18",), num=1000, batch_size=250)
    return c


def sit_config() -> ml_collections.ConfigDict:
    """SiT on the latents of `difflax encode` (SiT, Ma et al. 2024): the linear interpolant
    with a velocity target (SiT Sec. 3's best) and Heun's ODE sampler. The latent shape and
    class count come from `data.latents_dir`'s latents.json; `model.memory` conditions on
    the stored GMem snippets instead of (`conditional = False`) or with the labels."""
    c = get_config()
    c.data = dict(name="latents", latents_dir="", random_flip=True, sample_posterior=True)
    c.model = dict(kind="sit", patch_size=2, hidden_size=384, depth=12, num_heads=6,
                   mlp_ratio=4.0, class_dropout_prob=0.1, learn_sigma=False, conditional=True,
                   memory=False, snippet_dropout_prob=0.4, repa_depth=4, repa_hidden=2048)
    # SiT's transport (willisma/SiT `create_transport`): loss_weight "" (none), "velocity",
    # "likelihood". repa_weight > 0 adds REPA's alignment loss (GMem's code: 0.5, the tokens
    # after block model.repa_depth = 4 through an MLP of width model.repa_hidden = 2048) with
    # the features stored by `difflax encode --features` as targets.
    c.transport = dict(interpolant="linear", prediction="velocity", loss_weight="",
                       repa_weight=0.0)
    c.train.update(lr=1e-4, warmup_steps=0, ema_halflife_kimg=500.0)
    # SiT's ODE (`difflax.interpolants.sample_ode`): method euler or heun, `steps` intervals;
    # memory runs draw snippets from the stored bank, uniformly or by frequency
    c.sample = dict(method="heun", steps=50, num=64, cfg_scale=1.0, bank_sampling="uniform",
                    seed=1)
    c.evaluate = dict(samplers=("heun:50",), num=1000, batch_size=250)
    return c


def tiny_run(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `:smoke` settings every real-data config shares: one step, a few samples."""
    c.train.update(steps=1, batch_size=4, warmup_steps=1, log_every=1, ckpt_every=1)
    c.sample.update(num=4, steps=2)
    c.evaluate.update(num=8, batch_size=4, samplers=("edm_heun:2",))
    return c
