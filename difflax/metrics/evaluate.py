"""Sample-quality evaluation: draw N images in batches, stream feature statistics, report.

The caller owns sampling (and any sharding over devices): ``sample_fn(key, batch_size)``
returns a batch of NHWC images in [-1, 1], optionally with the class labels it was asked
for, as ``(images, labels)``. :func:`evaluate_samples` draws ``num_samples`` images with
one key per batch (``fold_in(key, i)``), always with the same batch size so the sampler
compiles once (the last batch is truncated), feeds every batch to each metric's feature
network, accumulates float64 statistics (:mod:`difflax.metrics.frechet`) and returns a
dict of metrics. Nothing but the running statistics is kept.

Metrics: ``fd_digits`` and ``class_accuracy`` for the embedded digits
(:func:`evaluate_digits`), ``fid`` with the FID Inception and published reference
statistics (:func:`inception_frechet_metric`).
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from difflax.metrics import frechet as _frechet
from difflax.metrics.digits_features import (
    digits_features,
    digits_logits,
    digits_reference_stats,
    load_digits_classifier,
)
from difflax.metrics.inception import inception_features

__all__ = [
    "FrechetMetric",
    "evaluate_samples",
    "evaluate_digits",
    "digits_frechet_metric",
    "inception_frechet_metric",
    "dataset_stats",
    "quantize_to_uint8_levels",
]

SampleFn = Callable[[jax.Array, int], "jax.Array | tuple[jax.Array, jax.Array]"]


class FrechetMetric(NamedTuple):
    """A Frechet distance to reference statistics in the feature space of ``feature_fn``.

    Attributes:
      name: key of the result dict (e.g. ``"fid"``, ``"fd_digits"``).
      feature_fn: images (B, H, W, C) in [-1, 1] -> features (B, D).
      mu, sigma: reference mean (D,) and covariance (D, D).
    """

    name: str
    feature_fn: Callable[[jax.Array], jax.Array]
    mu: np.ndarray
    sigma: np.ndarray


def quantize_to_uint8_levels(images: jax.Array) -> jax.Array:
    """Rounds [-1, 1] images to the 256 levels of an 8-bit PNG (values stay in [-1, 1]),
    as when samples are saved to PNG and read back for pytorch-fid / EDM."""
    levels = jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255)
    return levels / 127.5 - 1.0


def _split_batch(out):
    if isinstance(out, (tuple, list)):
        images, labels = out
        return images, labels
    return out, None


def evaluate_samples(sample_fn: SampleFn, *, key: jax.Array, num_samples: int, batch_size: int,
                     frechet_metrics: Sequence[FrechetMetric] = (),
                     classify_fn: Callable[[jax.Array], jax.Array] | None = None,
                     progress: bool = True, frechet_method: str = "sqrtm") -> dict[str, float]:
    """Draws ``num_samples`` images in batches and computes metrics on the fly.

    Args:
      sample_fn: ``(key, batch_size) -> images`` or ``(images, labels)``; images (B, H, W, C)
        in [-1, 1], labels (B,) int. Called ``ceil(num_samples / batch_size)`` times with
        ``jax.random.fold_in(key, i)``; the last batch is truncated.
      key: PRNG key.
      num_samples: total number of images (e.g. 50_000 for FID).
      batch_size: images per call of ``sample_fn``.
      frechet_metrics: distances to compute; the result has one entry per ``metric.name``.
      classify_fn: images -> logits (B, K); with labels from ``sample_fn`` gives
        ``class_accuracy``, the fraction of samples classified as the requested class.
      progress: show a tqdm progress bar.
      frechet_method: "sqrtm" (pytorch-fid's computation) or "eigh" (same value, faster);
        see :func:`difflax.metrics.frechet_distance`.
    Returns:
      ``{name: distance, ..., "class_accuracy": float (if labels), "num_samples": n}``.
    """
    if num_samples < 2:
        raise ValueError("need at least 2 samples for covariance statistics")
    stats = [None] * len(frechet_metrics)
    correct = labelled = done = 0
    with tqdm(total=num_samples, disable=not progress, unit="img", desc="evaluate") as bar:
        for i in range(-(-num_samples // batch_size)):
            images, labels = _split_batch(sample_fn(jax.random.fold_in(key, i), batch_size))
            take = min(batch_size, num_samples - done)
            images = images[:take]
            for j, metric in enumerate(frechet_metrics):
                feats = np.asarray(metric.feature_fn(images), np.float64)
                stats[j] = _frechet.update_stats(stats[j] or _frechet.init_stats(feats.shape[1]), feats)
            if labels is not None and classify_fn is not None:
                pred = np.asarray(jnp.argmax(classify_fn(images), axis=-1))
                correct += int(np.sum(pred == np.asarray(labels)[:take]))
                labelled += take
            done += take
            bar.update(take)
    results: dict[str, float] = {}
    for metric, s in zip(frechet_metrics, stats):
        mu, sigma = _frechet.stats_mean_cov(s)
        results[metric.name] = _frechet.frechet_distance(mu, sigma, metric.mu, metric.sigma,
                                                             method=frechet_method)
    if labelled:
        results["class_accuracy"] = correct / labelled
    results["num_samples"] = done
    return results


def dataset_stats(batches: Iterable[jax.Array], feature_fn: Callable[[jax.Array], jax.Array],
                  *, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 of the features of a stream of image batches, e.g. to write
    reference statistics of a dataset with :func:`difflax.metrics.save_stats`."""
    stats = None
    for images in tqdm(batches, disable=not progress, unit="batch", desc="statistics"):
        feats = np.asarray(feature_fn(images), np.float64)
        stats = _frechet.update_stats(stats or _frechet.init_stats(feats.shape[1]), feats)
    if stats is None:
        raise ValueError("no batches")
    return _frechet.stats_mean_cov(stats)


def digits_frechet_metric(classifier_params, resolution: int) -> FrechetMetric:
    """``fd_digits``: Frechet distance in the digits classifier's 64-d feature space to the
    1797 real digits at ``resolution`` (brought there as the data pipeline does)."""
    mu, sigma = digits_reference_stats(classifier_params, resolution)

    def feature_fn(images):
        if images.shape[1:3] != (resolution, resolution):
            raise ValueError(f"fd_digits reference is at {resolution}x{resolution}, "
                             f"samples are {images.shape[1]}x{images.shape[2]}")
        return digits_features(classifier_params, images)

    return FrechetMetric("fd_digits", feature_fn, mu, sigma)


def evaluate_digits(sample_fn: SampleFn, *, key: jax.Array, num_samples: int, batch_size: int,
                    resolution: int = 16, cache_dir: str | None = None,
                    progress: bool = True) -> dict[str, float]:
    """``fd_digits`` (and ``class_accuracy`` if ``sample_fn`` returns labels) of a digits model.

    The classifier comes from the cache (trained in seconds if absent, see
    :func:`difflax.metrics.load_digits_classifier`). The result also holds the classifier's
    held-out accuracy on real digits, ``digits_classifier_test_accuracy``, as the ceiling
    that ``class_accuracy`` is to be read against.
    """
    clf = load_digits_classifier(cache_dir)
    metric = digits_frechet_metric(clf.params, resolution)
    results = evaluate_samples(sample_fn, key=key, num_samples=num_samples, batch_size=batch_size,
                               frechet_metrics=[metric],
                               classify_fn=lambda x: digits_logits(clf.params, x),
                               progress=progress)
    results["digits_classifier_test_accuracy"] = clf.test_accuracy
    return results


def inception_frechet_metric(inception_params, reference: str | tuple[np.ndarray, np.ndarray], *,
                             quantize: bool = True, chunk_size: int = 64) -> FrechetMetric:
    """``fid``: Frechet Inception distance to reference statistics.

    Args:
      inception_params: from :func:`difflax.metrics.load_inception`.
      reference: path of a pytorch-fid / EDM ``.npz`` (``mu``, ``sigma``) or a (mu, sigma) pair.
      quantize: round samples to 8-bit levels first, as published numbers (computed from
        PNG files) do.
      chunk_size: images per Inception call, bounding memory at 299x299.
    """
    mu, sigma = _frechet.load_stats(reference) if isinstance(reference, (str, bytes)) or hasattr(
        reference, "__fspath__") else tuple(np.asarray(a, np.float64) for a in reference)

    def feature_fn(images):
        if quantize:
            images = quantize_to_uint8_levels(images)
        return jnp.concatenate([inception_features(inception_params, images[i:i + chunk_size])
                                for i in range(0, images.shape[0], chunk_size)])

    return FrechetMetric("fid", feature_fn, mu, sigma)
