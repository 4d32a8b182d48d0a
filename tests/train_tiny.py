"""A tiny training run on the embedded digits, used by tests/test_training.py.

    python tests/train_tiny.py WORKDIR [STEPS] [SECONDS_PER_BATCH]

The delay slows the data iterator so that a test can kill the process mid-run.
"""
from __future__ import annotations

import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from difflax import data
from difflax.training import TrainConfig, train

BATCH = 8
RESOLUTION = 8


class TinyDenoiser(nn.Module):
    """Stand-in for difflax.models.Denoiser: EDM-preconditioned two-conv network."""

    features: int = 8
    sigma_data: float = 0.5
    dropout: float = 0.1
    input_shape: tuple[int, ...] = (RESOLUTION, RESOLUTION, 1)  # what training reads
    label_dim: int = 10

    @nn.compact
    def __call__(self, x, sigma, class_labels=None, skip_scales=None, train=False):
        s = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
        sd2 = self.sigma_data**2
        c_skip, c_out = sd2 / (s**2 + sd2), s * self.sigma_data / jnp.sqrt(s**2 + sd2)
        emb = nn.Dense(self.features)(jnp.log(sigma)[:, None] / 4)
        if class_labels is not None:
            emb = emb + nn.Dense(self.features)(class_labels)
        h = nn.Conv(self.features, (3, 3))(x / jnp.sqrt(s**2 + sd2)) + emb[:, None, None, :]
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        return c_skip * x + c_out * nn.Conv(x.shape[-1], (3, 3))(h)


def config(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=BATCH, lr=1e-2, warmup_steps=5, log_every=5,
                       ckpt_every=10, keep_checkpoints=2, sample_every=20, seed=0,
                       tensorboard=True)


def slow(batches, delay):
    for batch in batches:
        time.sleep(delay)
        yield batch


def sample_fn(params, step):
    """One denoising step from sigma = 2 on fixed noise: images (4, 8, 8, 1)."""
    sigma = jnp.full((4,), 2.0)
    z = jax.random.normal(jax.random.key(1), (4, RESOLUTION, RESOLUTION, 1)) * 2.0
    return jnp.clip(TinyDenoiser().apply({"params": params}, z, sigma, None), -1, 1)


def run(workdir: str, steps: int = 40, delay: float = 0.0, progress: bool = False):
    def make_batches(start):
        it = data.batch_iterator("digits", BATCH, seed=0, start_step=start,
                                 resolution=RESOLUTION)
        return slow(it, delay) if delay else it

    return train(config(steps), TinyDenoiser(), make_batches, workdir, sample_fn=sample_fn,
                 progress=progress)


if __name__ == "__main__":
    args = sys.argv[1:]
    run(args[0], int(args[1]) if len(args) > 1 else 40,
        float(args[2]) if len(args) > 2 else 0.0, progress=True)
