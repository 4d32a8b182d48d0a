"""2-rectified flow++ (rfpp) on the digits: Reflow pairs from the default job's model, then one
round of rectified-flow training initialised from it, for 1-2 NFE sampling.

    difflax train --config configs/digits_edm.py --workdir runs/digits     # the teacher
    python experiments/rectified_flow.py --config configs/digits_rf.py     # pairs, 2-RF, table

The 2-RF network is the teacher's (its architecture comes from the teacher's workdir; the
`model` section is unused). `rf` is rfpp's recipe (U-shaped time, a = 4; LPIPS-Huber): the
experiment also trains the uniform + L2 baseline and U-shaped + pseudo-Huber by overriding it.
LPIPS is LPIPS-AlexNet on the digits upsampled to 32x32 (VGG16 at 16x16 costs ~30 s per
training step on this 2-core CPU, AlexNet at 32x32 a small fraction of it). It needs
torchvision's ImageNet `alexnet-owt-7be5be79.pth` at `rf.lpips_backbone`; empty (the default,
since it cannot be downloaded here) means a random AlexNet with the real lpips v0.1 heads.
Variant `:smoke` runs everything for a few steps (needs a teacher; the digits_edm smoke run
`difflax train --config configs/digits_edm.py:smoke --workdir runs/digits_smoke` will do).
"""
from configs import digits_edm


def get_config(variant: str = ""):
    c = digits_edm.get_config()
    c.teacher = dict(workdir="runs/digits", edm_weights="", sampler="deis_tab3", steps=12,
                     eval_sampler="deis_tab3:10", sigma_min=0.002, sigma_max=80.0)
    c.reflow = dict(num_pairs=3072, chunk_size=512, seed=0)
    c.rf = dict(time_dist="u_shaped", a=4.0, logit_mean=0.0, logit_std=1.0,
                premetric="lpips_huber", huber_c_scaling="d", lpips_net="alex",
                lpips_backbone="", lpips_resolution=32, lpips_pooling="max", lpips_div_t=False,
                lpips_seed=0)
    c.train.update(steps=300, batch_size=64, lr=5e-4, warmup_steps=20, ema_halflife_kimg=2.0,
                   ema_rampup_ratio=0.05, log_every=25, ckpt_every=100, seed=0)
    c.evaluate.update(samplers=("rf_euler:1", "rf_euler:2"), num=1000, batch_size=250)
    c.evaluate.straightness_steps = 8
    c.evaluate.straightness_num = 256
    if variant == "smoke":
        c.teacher.workdir = "runs/digits_smoke"
        c.teacher.steps = 4
        c.teacher.eval_sampler = "deis_tab3:4"
        c.reflow.update(num_pairs=64, chunk_size=32)
        c.train.update(steps=4, batch_size=8, warmup_steps=1, log_every=2, ckpt_every=2)
        c.evaluate.update(num=16, batch_size=8)
        c.evaluate.straightness_steps = 2
        c.evaluate.straightness_num = 8
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of digits_rf; valid: '', 'smoke'")
    return c
