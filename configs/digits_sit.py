"""SiT on the digits, without memory (class labels) or with GMem (memory snippets).

    python experiments/gmem.py                          # both, fd_digits vs training steps
    python experiments/gmem.py --config configs/digits_sit.py:smoke

SiT-S-like at digits scale: 16x16x1 images, patch 4 (16 tokens), hidden 96, depth 4; the
linear interpolant with a velocity target (SiT's best setting, Sec. 3), Heun ODE sampling.
GMem's snippets are the 64-d features of a digits classifier trained offline with its own
seed (difflax.gmem.digits_snippet_encoder), one per training image. Variant `:smoke` is a
tiny run for tests and quick checks.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = dict(name="digits", resolution=16, holdout=180, seed=0)
    c.model = dict(patch_size=4, hidden_size=96, depth=4, num_heads=4, mlp_ratio=4.0,
                   class_dropout_prob=0.1, snippet_dropout_prob=0.4, learn_sigma=False)
    c.memory = dict(encoder_seed=1, kmeans_entries=0, svd_rank=0, sampling="uniform")
    c.transport = dict(interpolant="linear", prediction="velocity", loss_weight="")
    c.train = dict(steps=1600, batch_size=64, lr=1e-3, warmup_steps=100, weight_decay=0.0,
                   grad_clip=1.0, ema_halflife_kimg=5.0, ema_rampup_ratio=0.05, seed=0)
    c.sample = dict(method="heun", steps=20, cfg_scale=1.0, seed=1)
    c.evaluate = dict(at_steps=(200, 400, 800, 1600), num=500, batch_size=250)
    if variant == "smoke":
        c.model.update(hidden_size=16, depth=1, num_heads=2)
        c.train.update(steps=4, batch_size=8, warmup_steps=2)
        c.sample.update(steps=2)
        c.evaluate.update(at_steps=(2, 4), num=16, batch_size=8)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of digits_sit; valid: '', 'smoke'")
    return c
