"""ImageNet 64x64, class-conditional ADM with EDM preconditioning (EDM paper, Table 7).

EDM's `--arch=adm --cond=1`: model_channels 192, channel_mult [1,2,3,4], 3 blocks per
level, attention at 32, 16 and 8, dropout 0.10, lr 2e-4, batch 4096, EMA half-life 50M
images, 2.5G training images. Data: tensorflow-datasets `imagenet_resized/64x64`,
prepared on this machine first.

    difflax train --config configs/imagenet64_adm.py --workdir runs/imagenet64
"""
from configs import default


def get_config(variant: str = ""):
    c = default.get_config()
    c.data.name = "tfds:imagenet_resized/64x64"
    c.data.resolution = 64
    c.data.random_flip = False
    c.model.update(model_type="DhariwalUNet", model_channels=192, channel_mult=(1, 2, 3, 4),
                   num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10)
    c.train.update(steps=2_500_000_000 // 4096, batch_size=4096, lr=2e-4, warmup_steps=2500,
                   ema_halflife_kimg=50_000.0, log_every=100, ckpt_every=2000)
    c.evaluate.update(samplers=("edm_heun:40",), num=50_000, batch_size=500)
    if variant == "smoke":
        c.data.resolution = 16
        c.model.update(model_channels=64, channel_mult=(1, 2), num_blocks=1,
                       attn_resolutions=(8,))
        default.tiny_run(c)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of imagenet64_adm; valid: '', 'smoke'")
    return c
