"""CIFAR-10 2-rectified flow++, rfpp's set-up (Lee, Lin & Fanti 2024, Table 2 "config F";
sangyun884/rfpp README): teacher EDM's unconditional NCSN++ (`edm-cifar10-32x32-uncond-ve.pkl`,
EDM preconditioning), 1M Reflow pairs from its Heun sampler with 18 steps (35 NFE), the 2-RF
initialised from it, U-shaped time (a = 4), LPIPS-Huber with LPIPS divided by t
(`--lpips_divt`), LPIPS on images resized to 224 with average pooling (piq's
`LPIPS(replace_pooling=True)`), Adam lr 2e-4, batch 512, 5000 warm-up steps, 800k steps,
EMA decay 0.9999.

    python experiments/rectified_flow.py --config configs/cifar10_rf.py \
        --config.teacher.edm_weights=edm-cifar10-32x32-uncond-ve.pkl \
        --config.rf.lpips_backbone=vgg16-397923af.pth --workdir runs/cifar10_rf

Weights are local files (EDM's pickle; torchvision's VGG16 checkpoint); nothing is downloaded.
Variant `:smoke` shrinks everything to a few steps (still needs the two weight files).
"""
from configs import default


def get_config(variant: str = ""):
    c = default.get_config()
    c.data.update(name="tfds:cifar10", resolution=32)
    c.model.conditional = False  # the 2-RF network is the teacher's; this section is unused
    c.teacher = dict(workdir="", edm_weights="edm-cifar10-32x32-uncond-ve.pkl", sampler="edm_heun",
                     steps=18, eval_sampler="edm_heun:18", sigma_min=0.002, sigma_max=80.0)
    c.reflow = dict(num_pairs=1_000_000, chunk_size=10_000, seed=0)
    c.rf = dict(time_dist="u_shaped", a=4.0, logit_mean=0.0, logit_std=1.0,
                premetric="lpips_huber", huber_c_scaling="d", lpips_net="vgg",
                lpips_backbone="vgg16-397923af.pth", lpips_resolution=224, lpips_pooling="avg",
                lpips_div_t=True, lpips_seed=0)
    c.train.update(steps=800_000, batch_size=512, lr=2e-4, warmup_steps=5000, ema_decay=0.9999,
                   ema_halflife_kimg=500.0, log_every=100, ckpt_every=5000, grad_clip=0.0)
    c.evaluate.update(samplers=("rf_euler:1", "rf_euler:2"), num=50_000, batch_size=500)
    c.evaluate.straightness_steps = 8
    c.evaluate.straightness_num = 1000
    if variant == "smoke":
        c.reflow.update(num_pairs=16, chunk_size=8)
        c.teacher.update(steps=2, eval_sampler="edm_heun:2")
        c.rf.lpips_resolution = 32
        c.train.update(steps=2, batch_size=4, warmup_steps=1, log_every=1, ckpt_every=1)
        c.evaluate.update(num=8, batch_size=4)
        c.evaluate.straightness_steps = 2
        c.evaluate.straightness_num = 4
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of cifar10_rf; valid: '', 'smoke'")
    return c
