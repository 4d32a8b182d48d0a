"""SiT (class labels) or GMem (memory snippets) on the digits encoded by an SD-VAE.

    difflax encode --vae path/to/sd-vae --data digits --resolution 64 --out runs/digits_latents \
        --features digits_classifier
    difflax train --config configs/digits_latent_sit.py --workdir runs/digits_latent_sit
    difflax train --config configs/digits_latent_sit.py:gmem --workdir runs/digits_latent_gmem
    difflax train --config configs/digits_latent_sit.py:gmem_repa --workdir runs/digits_latent_repa
    difflax sample --workdir runs/digits_latent_gmem
    difflax evaluate --workdir runs/digits_latent_sit      # fd_digits of the decoded samples

The SD-VAE turns 64x64 digits into 8x8x4 latents; SiT-S-like at digits scale (patch 2, 16
tokens, hidden 96, depth 4), the linear interpolant with a velocity target (SiT Sec. 3),
Heun's ODE. Variant "gmem" conditions on the 64-d snippets stored by `--features
digits_classifier` (GMem Sec. 3) instead of the label; "gmem_repa" adds REPA's loss as GMem
trains (weight 0.5; the targets are the same stored features, pooled, where GMem's are DINOv2
patch tokens), the projector after block 1 of 4 (GMem: 4 of 12) of width 256 (GMem: 2048 on
hidden 768). "smoke", "gmem_smoke" and "gmem_repa_smoke" are tiny runs for tests and quick
checks (`--config.data.latents_dir=...` points them at any latents).
"""
from configs import default

VARIANTS = ("", "gmem", "gmem_repa", "smoke", "gmem_smoke", "gmem_repa_smoke")


def get_config(variant: str = ""):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of digits_latent_sit; valid: "
                         f"{', '.join(map(repr, VARIANTS))}")
    c = default.get_config("sit")
    c.data.latents_dir = "runs/digits_latents"
    c.model.update(patch_size=2, hidden_size=96, depth=4, num_heads=4, repa_depth=1,
                   repa_hidden=256)
    c.train.update(steps=1600, batch_size=64, lr=1e-3, warmup_steps=100, grad_clip=1.0,
                   ema_halflife_kimg=5.0, log_every=50, ckpt_every=400)
    c.sample.update(method="heun", steps=20)
    c.evaluate.update(samplers=("heun:20",), num=500)
    if variant.startswith("gmem"):
        c.model.update(conditional=False, memory=True)
    if variant.startswith("gmem_repa"):
        c.transport.repa_weight = 0.5
    if variant.endswith("smoke"):
        c.model.update(hidden_size=16, depth=1, num_heads=2, repa_hidden=16)
        c.train.update(steps=4, batch_size=8, warmup_steps=2, log_every=2, ckpt_every=2)
        c.sample.update(num=8, steps=2)
        c.evaluate.update(samplers=("euler:2",), num=16, batch_size=8)
    return c
