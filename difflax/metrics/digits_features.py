"""A small feature network for the embedded digits: ``fd_digits`` and class accuracy.

Inception features mean little on 8x8 digits, so the digits get their own feature network:
a small MLP classifier trained on ``sklearn.datasets.load_digits()`` (1797 images, 10
classes). Its 64-d penultimate activations play the role of Inception's pool features
(the Frechet distance computed on them is ``fd_digits``) and its logits give the accuracy
with which class-conditional samples are recognised as the class they were asked for.

Training is deterministic (fixed seeds, a jitted step in a loop), takes seconds on a CPU,
and is cached in ``$DIFFLAX_CACHE`` (default ``~/.cache/difflax``); the training loop and
the cache are :mod:`difflax.metrics.classifier`'s, shared with the MNIST network.

Images are NHWC (N, R, R, 1) in [-1, 1] at any resolution R; the network resizes them
bilinearly (antialiased when shrinking) to the digits' native 8x8 first, and it is trained
on digits that went through the 8 -> R -> 8 round trip for R in {8, 16, 32}, so it does not
matter which of these resolutions the digits pipeline uses.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from difflax.metrics.classifier import (TrainedClassifier, cached_classifier, classifier_accuracy,
                                        train_classifier)
from difflax.metrics.frechet import mean_cov

__all__ = [
    "DigitsClassifier",
    "WORKING_RESOLUTION",
    "real_digits",
    "train_digits_classifier",
    "load_digits_classifier",
    "digits_features",
    "digits_logits",
    "digits_reference_stats",
    "class_accuracy",
]

WORKING_RESOLUTION = 8
_CACHE_VERSION = 1  # bump whenever the network or its training recipe changes
_TEST_FRACTION = 0.2


class DigitsClassifier(nn.Module):
    """MLP 64-256-64-10 on (N, R, R, 1) images in [-1, 1]; returns (features (N, 64), logits (N, 10))."""

    num_features: int = 64
    num_classes: int = 10
    resolution: int = WORKING_RESOLUTION

    @nn.compact
    def __call__(self, images):
        x = jnp.asarray(images, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != 1:
            raise ValueError(f"expected NHWC images of shape (N, R, R, 1), got {x.shape}")
        if x.shape[1:3] != (self.resolution, self.resolution):
            x = jax.image.resize(x, (x.shape[0], self.resolution, self.resolution, 1), "bilinear")
        x = x.reshape(x.shape[0], -1)
        x = nn.swish(nn.Dense(256)(x))
        features = nn.swish(nn.Dense(self.num_features)(x))
        logits = nn.Dense(self.num_classes)(features)
        return features, logits


def real_digits(resolution: int = WORKING_RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 sklearn digits as ((N, R, R, 1) float32 in [-1, 1], (N,) int32 labels).

    Pixel values 0..16 map linearly to [-1, 1]; the 8x8 images are resized to R x R with
    bilinear ``jax.image.resize``, as the library's digits pipeline does.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    x = x[..., None]
    if resolution != 8:
        x = np.asarray(jax.image.resize(x, (x.shape[0], resolution, resolution, 1), "bilinear"))
    return x, d.target.astype(np.int32)


def _split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed train / test index split (20% held out)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(_TEST_FRACTION * n))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _resolution_round_trips(images8: np.ndarray) -> np.ndarray:
    """(3, N, 8, 8, 1): the 8x8 digits as they arrive after the pipeline's resize to 8, 16, 32
    and the network's resize back to 8, so that the classifier is trained on what it sees."""
    out = [images8]
    for r in (16, 32):
        up = jax.image.resize(images8, (images8.shape[0], r, r, 1), "bilinear")
        out.append(np.asarray(jax.image.resize(up, images8.shape, "bilinear")))
    return np.stack(out)


def train_digits_classifier(*, seed: int = 0, steps: int = 2000, batch_size: int = 128,
                            learning_rate: float = 2e-3) -> TrainedClassifier:
    """Trains the classifier on a fixed 80% of the digits and measures accuracy on the rest.

    Deterministic for a given seed (7 s on one core of this CPU). Each training example is
    drawn at one of the resolutions 8, 16, 32 (resized back to 8 as the network does), so the
    accuracy holds whatever resolution the data pipeline uses. AdamW with cosine decay, one
    jitted step in a loop (:func:`difflax.metrics.classifier.train_classifier`). The reported
    accuracy is on the held-out 8x8 digits.
    """
    images, labels = real_digits(8)
    train_idx, test_idx = _split(len(labels))
    x_train = jnp.asarray(_resolution_round_trips(images[train_idx]))  # (3, n, 8, 8, 1)
    y_train = jnp.asarray(labels[train_idx])

    def batch_fn(key):
        k_idx, k_res = jax.random.split(key)
        idx = jax.random.randint(k_idx, (batch_size,), 0, x_train.shape[1])
        res = jax.random.randint(k_res, (batch_size,), 0, x_train.shape[0])
        return x_train[res, idx], y_train[idx]

    params = train_classifier(DigitsClassifier(), batch_fn, x_train[0, :1], seed=seed, steps=steps,
                              learning_rate=learning_rate)
    return TrainedClassifier(params, class_accuracy(params, images[test_idx], labels[test_idx]))


def load_digits_classifier(cache_dir: str | None = None, *, retrain: bool = False) -> TrainedClassifier:
    """The trained digits classifier, from the cache or trained (seconds) and cached.

    Args:
      cache_dir: directory of the cache; default :func:`default_cache_dir`.
      retrain: train anew even if a cached copy exists (and overwrite it).
    """
    return cached_classifier(f"digits_classifier_v{_CACHE_VERSION}.npz",
                             lambda: train_digits_classifier(), cache_dir, retrain)


@jax.jit
def _apply(params, images):
    return DigitsClassifier().apply({"params": params}, images)


def digits_features(params, images) -> jax.Array:
    """(N, 64) penultimate features of (N, R, R, 1) images in [-1, 1]."""
    return _apply(params, images)[0]


def digits_logits(params, images) -> jax.Array:
    """(N, 10) class logits of (N, R, R, 1) images in [-1, 1]."""
    return _apply(params, images)[1]


def class_accuracy(params, images, labels) -> float:
    """Fraction of images whose predicted digits class equals ``labels`` (N,)."""
    return classifier_accuracy(lambda x: digits_logits(params, x), images, labels)


def digits_reference_stats(params, resolution: int = WORKING_RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """(mu (64,), sigma (64, 64)) of all 1797 real digits at resolution R, float64.

    The real digits are brought to R exactly as the data pipeline does (bilinear from 8x8)
    and then go through the same network as the samples.
    """
    images, _ = real_digits(resolution)
    feats = np.concatenate([np.asarray(digits_features(params, images[i:i + 512]))
                            for i in range(0, len(images), 512)])
    return mean_cov(feats)
