"""SiT-XL/2 on ImageNet 256x256 in SD-VAE latent space (32x32x4), SiT's recipe; variant
"gmem" conditions on GMem's memory snippets instead of the labels.

    difflax train --config configs/imagenet256_sit.py --workdir runs/imagenet256_sit
    difflax sample --workdir runs/imagenet256_sit --vae path/to/sd-vae-ft-ema

SiT (Ma et al. 2024) Sec. 4 and its train.py: batch 256, AdamW lr 1e-4, no weight decay,
no warm-up, EMA decay 0.9999, class dropout 0.1 (guidance), the linear interpolant with a
velocity target and no loss weight, learned sigma (DiT's head); FID-50K 2.06 at 7M steps
with cfg 1.5 (its SDE sampler; difflax's CLI runs its ODE: Heun, 125 intervals = 250 NFE).
`data.latents_dir` is the output directory of `difflax.latents.encode_dataset` for ImageNet's
256x256 center crops and the SD-VAE (`stabilityai/sd-vae-ft-ema`, a local folder; `difflax
encode` reads digits and MNIST, so ImageNet is encoded by calling `encode_dataset` on your
image batches; with GMem snippets, pass `feature_fn`, e.g. DINOv2-B class tokens, 768-d).
Variant "gmem" (GMem, Tang et al. 2024, Sec. 3-4): the same SiT-XL/2 conditioned on the stored
snippets only, snippet dropout 0.4 (GMem's null condition for guidance), snippets drawn
from the bank by frequency at sampling; GMem's REPA term is not in `difflax train`.
Variant "smoke": a tiny stand-in of the same code path.
"""
from configs import default

VARIANTS = ("", "gmem", "smoke")


def get_config(variant: str = ""):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of imagenet256_sit; valid: "
                         f"{', '.join(map(repr, VARIANTS))}")
    c = default.get_config("sit")
    c.data.update(latents_dir="runs/imagenet256_latents", random_flip=True, sample_posterior=True)
    c.model.update(patch_size=2, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
                   class_dropout_prob=0.1, learn_sigma=True, conditional=True, memory=False)
    c.transport.update(interpolant="linear", prediction="velocity", loss_weight="")
    c.train.update(steps=7_000_000, batch_size=256, lr=1e-4, warmup_steps=0, weight_decay=0.0,
                   grad_clip=0.0, ema_decay=0.9999, log_every=100, ckpt_every=50_000,
                   sample_every=0)
    c.sample.update(method="heun", steps=125, num=64, cfg_scale=1.5)
    c.evaluate.update(samplers=("heun:125",), num=50_000, batch_size=125)
    if variant == "gmem":
        c.model.update(conditional=False, memory=True, snippet_dropout_prob=0.4)
        c.train.steps = 250_000  # GMem's claim: SiT's 7M-step quality in < 150K steps
        c.sample.update(bank_sampling="frequency", cfg_scale=1.0)
    elif variant == "smoke":
        c.model.update(hidden_size=16, depth=1, num_heads=2)
        c.train.update(steps=2, batch_size=4, log_every=1, ckpt_every=1)
        c.sample.update(num=4, steps=2)
        c.evaluate.update(samplers=("heun:2",), num=8, batch_size=4)
    return c
