"""A-SDM model assembly on the MNIST testbed (experiments/model_assembly.py).

    python experiments/model_assembly.py --config configs/mnist_assembly.py [--workdir mnist_edm]

As `digits_assembly.py`, for the MNIST UNet (levels 32, 16, 8; one block per encoder level,
two per decoder level): the residual branches of the middle `in1` and of the last block of
each decoder level removed (4 of its 15 prunable blocks), then + CLME-CondConv, + GRI
attention, + semantic-aware supervision (MNIST-classifier features). Variant `:smoke` runs
every path for a few steps on a few samples.
"""
from configs import digits_assembly

DROP = ("dec.8x8_in1", "dec.8x8_block1", "dec.16x16_block1", "dec.32x32_block1")


def get_config(variant: str = ""):
    c = digits_assembly.get_config(variant)
    c.teacher_workdir = "mnist_edm"
    c.surgery.drop_blocks = DROP
    return c
