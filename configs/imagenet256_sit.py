"""SiT-XL/2 on ImageNet 256x256 (32x32x4 SD-VAE latents), with GMem's memory or class labels.

    variant "" (GMem): SiT-XL/2 conditioned on 768-d DINOv2-B class tokens of each training
      image (GMem: one snippet per image, snippet dropout 0.1 for guidance),
      linear interpolant, velocity, SDE Euler 250 steps with w_t = sigma_t, no guidance.
    variant "sit": SiT's own recipe (SiT Sec. 4: batch 256, AdamW lr 1e-4, no weight decay,
      EMA 0.9999, class labels with dropout 0.1; FID-50K 2.06 with cfg 1.5 at 7M steps).
    variant "smoke": a tiny stand-in of the same code path.

Nothing is downloaded: `data.latents` is an .npz of pre-computed latents (`latents`
(N, 32, 32, 4), scaled by 0.18215, and `labels` (N,)) and `memory.features` an .npz of
encoder features (`features` (N, 768), same order), both made on your machine
(e.g. with GMem's `extract_features.py`). `difflax.gmem.build_memory_bank` /
`save_memory_bank` turn the features into a bank.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = dict(name="imagenet256_latents", latents="", resolution=32, channels=4)
    c.model = dict(preset="SiT-XL/2", class_dropout_prob=0.1, snippet_dropout_prob=0.4,
                   learn_sigma=True, num_classes=0, snippet_dim=768,
                   repa_depth=8, repa_dim=768, repa_hidden=2048)  # REPA on block 8, as GMem
    # REPA targets: per-patch DINOv2 features (N, 256, 768) in `memory.repa_targets` (.npz)
    c.memory = dict(features="", bank="", repa_targets="", kmeans_entries=0, svd_rank=0,
                    sampling="frequency")
    c.transport = dict(interpolant="linear", prediction="velocity", loss_weight="",
                       repa_weight=0.5)  # REPA's lambda
    # GMem's claim: SiT's 7M-step quality in < 150K steps (46.7x); budget 250K steps.
    c.train = dict(steps=250_000, batch_size=256, lr=1e-4, warmup_steps=0, weight_decay=0.0,
                   grad_clip=0.0, ema_decay=0.9999, seed=0)
    c.sample = dict(kind="sde", method="euler", steps=250, diffusion_form="sigma",
                    last_step="mean", last_step_size=0.04, cfg_scale=1.0, seed=0)
    c.evaluate = dict(num=50_000, batch_size=125)
    if variant == "sit":
        c.model.update(num_classes=1000, snippet_dim=0, repa_dim=0, repa_depth=0)
        c.transport.repa_weight = 0.0
        c.train.steps = 7_000_000
        c.sample.update(cfg_scale=1.5)
    elif variant == "smoke":
        c.model.update(preset="SiT-S/8", num_classes=0, snippet_dim=8, repa_dim=8,
                       repa_depth=2, repa_hidden=16)
        c.train.update(steps=1, batch_size=2)
        c.sample.update(steps=2)
        c.evaluate.update(num=4, batch_size=2)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of imagenet256_sit; valid: '', 'sit', 'smoke'")
    return c
