"""GMem's training data (GMem Sec. 3): batches of training images with the memory snippet of
each, for SiT's interpolant loss in the one training loop, `difflax.training.train`.

The snippet is the network's second condition (`difflax.models.SiT`, `snippet_dim` > 0) and
the loss reads it from the batch (`difflax.training.interpolant_loss.get_interpolant_loss_fn`:
batches (images, labels, snippets)); both are generic conditioning, so the same loop trains the
class-conditional SiT baseline (snippets None) and GMem (snippets = `bank.snippets_of(i)` of
training image i, looked up once before training):

    make_batches = get_batches_fn(images, labels, snippets, batch_size=64, seed=0)
    get_loss_fn = lambda m: get_interpolant_loss_fn(m, interpolant="linear", prediction="velocity")
    state = difflax.training.train(cfg, model, make_batches, workdir, get_loss_fn=get_loss_fn)

Step s (1-based) draws `batch_size` training rows with replacement from
`numpy.random.default_rng((seed, s))`: batch s depends only on (seed, s), so a run trained in
increments (the loop resuming from its checkpoint) sees the batches of one uninterrupted run.
(SiT and GMem on stored VAE latents use `difflax.latents.latent_batches` instead.)
"""
from __future__ import annotations

import itertools

import numpy as np


def batch_rows(seed: int, step: int, num_rows: int, batch_size: int) -> np.ndarray:
    """(batch_size,) row indices of training step `step`, drawn with replacement."""
    return np.random.default_rng((seed, step)).integers(0, num_rows, batch_size)


def get_batches_fn(images: np.ndarray, labels: np.ndarray, snippets: np.ndarray | None = None,
                   *, batch_size: int, seed: int, repa_targets: np.ndarray | None = None):
    """make_batches(start_step) -> iterator of (images (B, H, W, C), labels (B,)[, snippets
    (B, D)][, repa_targets (B, ...)]) for steps start_step + 1, start_step + 2, ...
    (`batch_rows`), the argument `difflax.training.train` takes. images in [-1, 1]; labels
    int; snippets the memory snippet of each image (GMem) or None (the label-conditioned SiT);
    repa_targets the encoder features of each image, (N, T, D) per token or (N, D) pooled,
    for REPA's alignment loss (`get_interpolant_loss_fn(..., repa_weight=)` reads them last),
    or None. One process (the rows are the global batch)."""
    extras = tuple(a for a in (snippets, repa_targets) if a is not None)

    def make_batches(start_step: int):
        for step in itertools.count(start_step + 1):
            idx = batch_rows(seed, step, len(images), batch_size)
            yield (images[idx], labels[idx]) + tuple(a[idx] for a in extras)

    return make_batches
