"""A-SDM model assembly on the default job's digits model (experiments/model_assembly.py).

    python experiments/model_assembly.py --config configs/digits_assembly.py [--workdir runs/digits]

Students of the teacher in `teacher_workdir`: the residual branches of `drop_blocks` removed
(about a quarter of the FLOPs: the second block of each encoder level with two, the middle
`in1`, the middle block of each decoder level, as BK-SDM / A-SDM remove the redundant
"R+A" pairs), then + CLME-CondConv (`condconv_experts` experts from the removed kernels),
+ GRI attention, + semantic-aware supervision (digits-classifier features), each distilled
for `distill.steps`. Variant `:smoke` runs every path for a few steps on a few samples.
"""
import ml_collections

DROP = ("enc.16x16_block1", "enc.8x8_block1", "dec.4x4_in1", "dec.4x4_block1",
        "dec.8x8_block1", "dec.16x16_block1")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.teacher_workdir = "runs/digits"
    c.surgery = dict(drop_blocks=DROP, condconv_experts=2, gri_window=4, gri_pool=2,
                     gri_combine="joint")
    c.distill = dict(steps=150, stages=1, batch_size=64, lr=1e-3, warmup_steps=20,
                     ema_halflife_kimg=2.0, task=1.0, output=1.0, features=1.0, semantic=0.1)
    c.evaluate = dict(sampler="deis_tab3", steps=10, num=2000, batch_size=250, seed=1)
    c.timing = dict(batch_size=250, repeats=7)
    # multi-UNet switching: the teacher for the first k of the sampler's model evaluations
    c.switch = dict(student="pruned", full_steps=(3, 5))
    if variant == "smoke":
        c.distill.update(steps=2, batch_size=8, warmup_steps=1)
        c.evaluate.update(num=16, batch_size=8, steps=4)  # deis_tab3 needs 4 steps
        c.timing.update(batch_size=8, repeats=2)
        c.switch.update(full_steps=(1,))
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of digits_assembly; valid: '', 'smoke'")
    return c
