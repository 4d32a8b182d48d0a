"""CIFAR-10 32x32, class-conditional DDPM++ with EDM preconditioning (EDM paper, Table 7).

EDM's `--arch=ddpmpp --cond=1`: model_channels 128, channel_mult [2,2,2], 4 blocks per
level, attention at 16x16, dropout 0.13, lr 1e-3, batch 512, EMA half-life 500k images,
200M training images (EDM also uses its augmentation pipeline, not included here).
CIFAR-10 must be prepared with tensorflow-datasets on this machine first.

    difflax train --config configs/cifar10_ddpmpp.py --workdir runs/cifar10
"""
from configs import default


def get_config(variant: str = ""):
    c = default.get_config()
    c.data.name = "tfds:cifar10"
    c.data.resolution = 32
    c.data.random_flip = True
    c.model.update(model_type="SongUNet", model_channels=128, channel_mult=(2, 2, 2),
                   num_blocks=4, attn_resolutions=(16,), dropout=0.13)
    c.train.update(steps=200_000_000 // 512, batch_size=512, lr=1e-3, warmup_steps=200,
                   ema_halflife_kimg=500.0, log_every=100, ckpt_every=5000)
    c.evaluate.update(samplers=("edm_heun:18",), num=50_000, batch_size=500)
    if variant == "smoke":
        c.model.update(model_channels=16, channel_mult=(1, 2), num_blocks=1)
        default.tiny_run(c)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of cifar10_ddpmpp; valid: '', 'smoke'")
    return c
