"""A small CNN feature network for MNIST: ``fd_mnist`` and class accuracy.

The MNIST testbed's counterpart of :mod:`difflax.metrics.digits_features`: a small CNN
classifier trained offline on MNIST's 60,000 training digits (`difflax.data.load_mnist`,
32x32: the 28x28 digits padded by 2), whose 64-d penultimate activations are the feature
space of ``fd_mnist`` and whose logits give class accuracy. Its held-out accuracy is
measured on the 10,000 test digits (0.9936). Training (about six epochs, a jitted step in a loop)
runs once, on first use, and is cached in ``$DIFFLAX_CACHE`` like the digits network.

``fd_mnist`` compares samples with the 10,000 *test* digits (:func:`mnist_reference_stats`):
they are seen neither by this network nor by a model trained on the training set, and 10k
features are cheap to recompute. Images are NHWC (N, R, R, 1) in [-1, 1]; the network
resizes any R other than 32 bilinearly to 32 first.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from difflax.data import load_mnist
from difflax.metrics.classifier import (TrainedClassifier, cached_classifier, classifier_accuracy,
                                        train_classifier)
from difflax.metrics.frechet import mean_cov

__all__ = [
    "MnistClassifier",
    "train_mnist_classifier",
    "load_mnist_classifier",
    "mnist_features",
    "mnist_logits",
    "mnist_class_accuracy",
    "mnist_reference_stats",
]

_CACHE_VERSION = 2  # bump whenever the network or its training recipe changes
_RESOLUTION = 32


class MnistClassifier(nn.Module):
    """CNN on (N, R, R, 1) images in [-1, 1]: three 3x3 convolutions (16, 32, 64 channels),
    each followed by swish and 2x2 average pooling (32 -> 4), then Dense 64 (the features)
    and Dense 10. Returns (features (N, 64), logits (N, 10))."""

    num_features: int = 64
    num_classes: int = 10

    @nn.compact
    def __call__(self, images):
        x = jnp.asarray(images, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != 1:
            raise ValueError(f"expected NHWC images of shape (N, R, R, 1), got {x.shape}")
        if x.shape[1:3] != (_RESOLUTION, _RESOLUTION):
            x = jax.image.resize(x, (x.shape[0], _RESOLUTION, _RESOLUTION, 1), "bilinear")
        for channels in (16, 32, 64):
            x = nn.avg_pool(nn.swish(nn.Conv(channels, (3, 3))(x)), (2, 2), (2, 2))
        features = nn.swish(nn.Dense(self.num_features)(x.reshape(x.shape[0], -1)))
        return features, nn.Dense(self.num_classes)(features)


def train_mnist_classifier(*, seed: int = 0, steps: int = 3000, batch_size: int = 128,
                           learning_rate: float = 3e-3, train_size: int | None = None,
                           test_size: int | None = None) -> TrainedClassifier:
    """Trains :class:`MnistClassifier` on MNIST's training set; accuracy on its test set.

    The default, ~6.4 epochs of batch 128, is the cached network (test accuracy 0.9936;
    4 min 11 s on one core of this project's CPU, 2026-11-30). ``train_size`` /
    ``test_size`` use only the first n training / test digits (for quick tests).
    Deterministic for a given seed.
    """
    x_train, y_train = load_mnist("train", _RESOLUTION)
    x_test, y_test = load_mnist("test", _RESOLUTION)
    x_train, y_train = jnp.asarray(x_train[:train_size]), jnp.asarray(y_train[:train_size])

    def batch_fn(key):
        idx = jax.random.randint(key, (batch_size,), 0, x_train.shape[0])
        return x_train[idx], y_train[idx]

    params = train_classifier(MnistClassifier(), batch_fn, x_train[:1], seed=seed, steps=steps,
                              learning_rate=learning_rate)
    accuracy = mnist_class_accuracy(params, x_test[:test_size], y_test[:test_size])
    return TrainedClassifier(params, accuracy)


def load_mnist_classifier(cache_dir: str | None = None, *, retrain: bool = False) -> TrainedClassifier:
    """The trained MNIST classifier, from the cache or trained now (about 4 minutes on one
    CPU core) and cached; ``cache_dir`` defaults to ``$DIFFLAX_CACHE``."""
    return cached_classifier(f"mnist_classifier_v{_CACHE_VERSION}.npz",
                             lambda: train_mnist_classifier(), cache_dir, retrain)


@jax.jit
def _apply(params, images):
    return MnistClassifier().apply({"params": params}, images)


def mnist_features(params, images) -> jax.Array:
    """(N, 64) penultimate features of (N, R, R, 1) images in [-1, 1]."""
    return _apply(params, images)[0]


def mnist_logits(params, images) -> jax.Array:
    """(N, 10) class logits of (N, R, R, 1) images in [-1, 1]."""
    return _apply(params, images)[1]


def mnist_class_accuracy(params, images, labels) -> float:
    """Fraction of images whose predicted MNIST class equals ``labels`` (N,)."""
    return classifier_accuracy(lambda x: mnist_logits(params, x), images, labels)


def mnist_reference_stats(params, resolution: int = _RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """(mu (64,), sigma (64, 64)) float64 of the 10,000 MNIST test digits at resolution R
    (brought there by `difflax.data.load_mnist`, as the data pipeline does)."""
    images, _ = load_mnist("test", resolution)
    feats = np.concatenate([np.asarray(mnist_features(params, images[i:i + 1000]))
                            for i in range(0, len(images), 1000)])
    return mean_cov(feats)
