"""SiT on the digits, without memory (class labels), with GMem (memory snippets), and GMem + REPA.

    python experiments/gmem.py                          # all three, fd_digits vs training steps
    python experiments/gmem.py --config configs/digits_sit.py:smoke

SiT-S-like at digits scale: 16x16x1 images, patch 4 (16 tokens), hidden 96, depth 4; the
linear interpolant with a velocity target (SiT's best setting, Sec. 3), Heun ODE sampling.
GMem's snippets are the 64-d features of a digits classifier trained offline with its own
seed (difflax.gmem.digits_snippet_encoder), one per training image; GMem + REPA also aligns
the tokens after block `repa.depth` with those features (REPA's loss, weight `repa.weight`;
`difflax.models.sit.repa_loss`). `model.snippet_dropout_prob` 0.4 is GMem's (its
`lightningdit.py` FeatureEmbedder). Variant `:smoke` is a tiny run for tests and quick checks.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = dict(name="digits", resolution=16, holdout=180, seed=0)
    c.model = dict(patch_size=4, hidden_size=96, depth=4, num_heads=4, mlp_ratio=4.0,
                   class_dropout_prob=0.1, snippet_dropout_prob=0.4, learn_sigma=False)
    c.memory = dict(encoder_seed=1, kmeans_entries=0, svd_rank=0, sampling="uniform")
    # REPA as GMem trains with it (LINs-lab/GMem: proj_loss_weight 0.5, projector after block 4
    # of GMem-B's 12, MLP width 2048 on hidden 768): a third of the depth, width ~2.7x hidden.
    # The targets are the snippet encoder's pooled features (GMem's: DINOv2 patch tokens).
    c.repa = dict(weight=0.5, depth=1, hidden=256)
    c.transport = dict(interpolant="linear", prediction="velocity", loss_weight="")
    c.train = dict(steps=1600, batch_size=64, lr=1e-3, warmup_steps=100, weight_decay=0.0,
                   grad_clip=1.0, ema_halflife_kimg=5.0, ema_rampup_ratio=0.05, seed=0)
    c.sample = dict(method="heun", steps=20, cfg_scale=1.0, seed=1)
    # bootstrap: resamples of the class accuracy's interval (fd_digits': 25-group jackknife)
    c.evaluate = dict(at_steps=(200, 400, 800, 1600), num=500, batch_size=250, bootstrap=200)
    if variant == "smoke":
        c.model.update(hidden_size=16, depth=1, num_heads=2)
        c.repa.update(hidden=16)
        c.train.update(steps=4, batch_size=8, warmup_steps=2)
        c.sample.update(steps=2)
        c.evaluate.update(at_steps=(2, 4), num=16, batch_size=8, bootstrap=20)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of digits_sit; valid: '', 'smoke'")
    return c
