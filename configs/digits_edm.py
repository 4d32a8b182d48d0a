"""The default job: a class-conditional DDPM++ (EDM preconditioning) on scikit-learn's digits.

    difflax train --config configs/digits_edm.py --workdir runs/digits
    difflax evaluate --workdir runs/digits

Variant `:smoke` trains a tiny model for a few steps (tests, quick checks).
"""
from configs import default


def get_config(variant: str = ""):
    c = default.get_config()
    c.model.model_channels = 16
    c.train.steps = 1000
    c.train.batch_size = 64
    c.train.lr = 2e-3
    c.train.ema_halflife_kimg = 5.0
    c.train.ckpt_every = 200
    c.train.log_every = 50
    c.evaluate.samplers = ("edm_heun:18", "deis_tab3:10")
    c.evaluate.num = 500
    if variant == "smoke":
        c.model.model_channels = 8
        c.model.channel_mult = (1, 2)
        c.model.num_blocks = 1
        c.model.attn_resolutions = ()
        c.train.steps = 4
        c.train.batch_size = 8
        c.train.warmup_steps = 2
        c.train.log_every = 2
        c.train.ckpt_every = 2
        c.sample.num = 8
        c.sample.steps = 3
        c.evaluate.samplers = ("edm_heun:3",)
        c.evaluate.num = 16
        c.evaluate.batch_size = 8
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of digits_edm; valid: '', 'smoke'")
    return c
