"""A small feature network for the embedded digits: ``fd_digits`` and class accuracy.

Inception features mean little on 8x8 digits, so the digits get their own feature network:
a small MLP classifier trained on ``sklearn.datasets.load_digits()`` (1797 images, 10
classes). Its 64-d penultimate activations play the role of Inception's pool features
(the Frechet distance computed on them is ``fd_digits``) and its logits give the accuracy
with which class-conditional samples are recognised as the class they were asked for.

Training is deterministic (fixed seeds, one jitted ``lax.scan``), takes seconds on a CPU,
and is cached in ``$DIFFLAX_CACHE`` (default ``~/.cache/difflax``).

Images are NHWC (N, R, R, 1) in [-1, 1] at any resolution R; the network resizes them
bilinearly (antialiased when shrinking) to the digits' native 8x8 first, and it is trained
on digits that went through the 8 -> R -> 8 round trip for R in {8, 16, 32}, so it does not
matter which of these resolutions the digits pipeline uses.
"""
from __future__ import annotations

import os
import tempfile
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from difflax.metrics.frechet import mean_cov

__all__ = [
    "DigitsClassifier",
    "TrainedDigitsClassifier",
    "WORKING_RESOLUTION",
    "default_cache_dir",
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


class TrainedDigitsClassifier(NamedTuple):
    """Parameters of a trained :class:`DigitsClassifier` and its held-out test accuracy."""

    params: dict
    test_accuracy: float


def default_cache_dir() -> str:
    """``$DIFFLAX_CACHE`` if set, else ``~/.cache/difflax``."""
    return os.environ.get("DIFFLAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "difflax")


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
                            learning_rate: float = 2e-3) -> TrainedDigitsClassifier:
    """Trains the classifier on a fixed 80% of the digits and measures accuracy on the rest.

    Deterministic for a given seed (seconds on a CPU: ~5 s compile + ~2 s of steps). Each training example is
    drawn at one of the resolutions 8, 16, 32 (resized back to 8 as the network does), so the
    accuracy holds whatever resolution the data pipeline uses. Adam(W) with cosine decay; the
    whole loop is one jitted ``lax.scan``. The reported accuracy is on the held-out 8x8 digits.
    """
    images, labels = real_digits(8)
    train_idx, test_idx = _split(len(labels))
    x_train = jnp.asarray(_resolution_round_trips(images[train_idx]))  # (3, n, 8, 8, 1)
    y_train = jnp.asarray(labels[train_idx])
    model = DigitsClassifier()
    key = jax.random.key(seed)
    params = model.init(key, x_train[0, :1])["params"]
    tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=1e-4)

    def loss_fn(p, x, y):
        _, logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry, i):
        p, opt_state = carry
        k_idx, k_res = jax.random.split(jax.random.fold_in(key, i))
        idx = jax.random.randint(k_idx, (batch_size,), 0, x_train.shape[1])
        res = jax.random.randint(k_res, (batch_size,), 0, x_train.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(p, x_train[res, idx], y_train[idx])
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    @jax.jit
    def run(p):
        (p, _), losses = jax.lax.scan(step, (p, tx.init(p)), jnp.arange(steps))
        return p, losses

    params, _ = run(params)
    params = jax.tree.map(np.asarray, params)
    accuracy = class_accuracy(params, images[test_idx], labels[test_idx])
    return TrainedDigitsClassifier(params, accuracy)


def _cache_path(cache_dir: str | None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), f"digits_classifier_v{_CACHE_VERSION}.npz")


def load_digits_classifier(cache_dir: str | None = None, *, retrain: bool = False) -> TrainedDigitsClassifier:
    """The trained digits classifier, from the cache or trained (seconds) and cached.

    Args:
      cache_dir: directory of the cache; default :func:`default_cache_dir`.
      retrain: train anew even if a cached copy exists (and overwrite it).
    """
    path = _cache_path(cache_dir)
    if not retrain and os.path.exists(path):
        with np.load(path) as f:
            flat = {tuple(k.split("/")[1:]): np.asarray(f[k]) for k in f.files if k.startswith("params/")}
            return TrainedDigitsClassifier(traverse_util.unflatten_dict(flat), float(f["test_accuracy"]))
    trained = train_digits_classifier()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    flat = {"params/" + "/".join(k): v for k, v in traverse_util.flatten_dict(trained.params).items()}
    # write-then-rename, so concurrent processes never read a half-written file
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, test_accuracy=np.float64(trained.test_accuracy), **flat)
    os.replace(tmp, path)
    return trained


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
    """Fraction of images whose predicted class equals ``labels`` (N,)."""
    pred = np.asarray(jnp.argmax(digits_logits(params, images), axis=-1))
    return float(np.mean(pred == np.asarray(labels)))


def digits_reference_stats(params, resolution: int = WORKING_RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """(mu (64,), sigma (64, 64)) of all 1797 real digits at resolution R, float64.

    The real digits are brought to R exactly as the data pipeline does (bilinear from 8x8)
    and then go through the same network as the samples.
    """
    images, _ = real_digits(resolution)
    feats = np.concatenate([np.asarray(digits_features(params, images[i:i + 512]))
                            for i in range(0, len(images), 512)])
    return mean_cov(feats)
