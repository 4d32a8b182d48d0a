"""What the small feature networks behind ``fd_digits`` and ``fd_mnist`` share.

Each is a classifier trained offline (deterministic, a jitted AdamW step in a loop, with
cosine decay), whose penultimate activations are the feature space of a Frechet distance
and whose logits give class accuracy. Trained networks are cached as ``.npz`` files in
``$DIFFLAX_CACHE`` (default ``~/.cache/difflax``) and trained on first use.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

__all__ = [
    "TrainedClassifier",
    "default_cache_dir",
    "train_classifier",
    "cached_classifier",
    "classifier_accuracy",
]


class TrainedClassifier(NamedTuple):
    """Parameters of a trained feature classifier and its held-out test accuracy."""

    params: dict
    test_accuracy: float


def default_cache_dir() -> str:
    """``$DIFFLAX_CACHE`` if set, else ``~/.cache/difflax``."""
    return os.environ.get("DIFFLAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "difflax")


def train_classifier(model: nn.Module, batch_fn: Callable, example: jax.Array, *, seed: int,
                     steps: int, learning_rate: float, weight_decay: float = 1e-4) -> dict:
    """Parameters of ``model`` (images -> (features, logits)) trained with softmax cross-entropy.

    ``batch_fn(key) -> (images, labels)`` draws one training batch inside the jitted step;
    ``example`` (1, ...) is the input used to initialise. AdamW with cosine decay of
    ``learning_rate`` over ``steps``, one jitted step per iteration of a Python loop,
    deterministic for a given ``seed``. Returns numpy parameters.
    """
    key = jax.random.key(seed)
    params = model.init(key, example)["params"]
    tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=weight_decay)

    def loss_fn(p, x, y):
        _, logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, opt_state, i):
        x, y = batch_fn(jax.random.fold_in(key, i))
        grads = jax.grad(loss_fn)(p, x, y)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    # a Python loop over the jitted step: XLA:CPU ran the MNIST CNN's step 20x slower inside
    # a lax.scan (2.09 s against 0.102 s per step, batch 128; experiments/classifier_scan_vs_loop.py)
    opt_state = tx.init(params)
    for i in range(steps):
        params, opt_state = step(params, opt_state, jnp.int32(i))
    return jax.tree.map(np.asarray, params)


def classifier_accuracy(logits_fn: Callable, images, labels, chunk: int = 1000) -> float:
    """Fraction of ``images`` whose argmax of ``logits_fn(images)`` equals ``labels`` (N,),
    evaluated ``chunk`` images at a time."""
    pred = np.concatenate([np.asarray(jnp.argmax(logits_fn(images[i:i + chunk]), axis=-1))
                           for i in range(0, len(images), chunk)])
    return float(np.mean(pred == np.asarray(labels)))


def cached_classifier(filename: str, train_fn: Callable[[], TrainedClassifier],
                      cache_dir: str | None = None, retrain: bool = False) -> TrainedClassifier:
    """The classifier cached as ``cache_dir/filename`` (default :func:`default_cache_dir`),
    or ``train_fn()`` trained now and cached (``retrain=True`` trains and overwrites)."""
    path = os.path.join(cache_dir or default_cache_dir(), filename)
    if not retrain and os.path.exists(path):
        with np.load(path) as f:
            flat = {tuple(k.split("/")[1:]): np.asarray(f[k]) for k in f.files if k.startswith("params/")}
            return TrainedClassifier(traverse_util.unflatten_dict(flat), float(f["test_accuracy"]))
    trained = train_fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    flat = {"params/" + "/".join(k): v for k, v in traverse_util.flatten_dict(trained.params).items()}
    # write-then-rename, so concurrent processes never read a half-written file
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, test_accuracy=np.float64(trained.test_accuracy), **flat)
    os.replace(tmp, path)
    return trained
