"""Sample-quality evaluation: draw N images in batches, stream feature statistics, report.

The caller owns sampling (and any sharding over devices): ``sample_fn(key, batch_size)``
returns a batch of NHWC images in [-1, 1], optionally with the class labels it was asked
for, as ``(images, labels)``. :func:`evaluate_samples` draws ``num_samples`` images with
one key per batch (``fold_in(key, i)``), always with the same batch size so the sampler
compiles once (the last batch is truncated), feeds every batch to each metric's feature
network, accumulates float64 statistics (:mod:`difflax.metrics.frechet`) and returns a
dict of metrics. Nothing but the running statistics is kept.

Metrics: ``fd_digits`` and ``class_accuracy`` for the embedded digits
(:func:`evaluate_digits`), ``fd_mnist`` and ``class_accuracy`` for MNIST
(:func:`evaluate_mnist`), each with bootstrap intervals, ``fid`` with the FID Inception and published reference
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
from difflax.metrics.confidence import (bootstrap_interval, frechet_difference_interval,
                                        frechet_jackknife_interval)
from difflax.metrics.inception import inception_features
from difflax.metrics.mnist_features import (
    load_mnist_classifier,
    mnist_features,
    mnist_logits,
    mnist_reference_stats,
)
from difflax.metrics.sample_store import SampleStore

__all__ = [
    "DATASET_METRICS",
    "DatasetMetric",
    "dataset_metric",
    "FrechetMetric",
    "evaluate_samples",
    "evaluate_digits",
    "evaluate_mnist",
    "digits_frechet_metric",
    "mnist_frechet_metric",
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
                     progress: bool = True, frechet_method: str = "sqrtm",
                     bootstrap: int = 0, level: float = 0.95, settings: int | None = None,
                     baseline: int | None = None, store: str | None = None,
                     store_tag: str = "") -> dict[str, float] | list[dict[str, float]]:
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
      bootstrap: if > 0, ``level`` intervals (:mod:`difflax.metrics.confidence`) as
        ``{name}_ci_low`` / ``{name}_ci_high``: each distance's from the delete-a-group
        jackknife (25 groups; the bootstrap is biased for Frechet distances), the class
        accuracy's from that many bootstrap resamples. The features (N, D) are then kept in
        memory. Groups and resamples are drawn with ``fold_in(key, number of batches)``.
      level: confidence level of the intervals.
      settings: K if ``sample_fn`` returns images (K, B, H, W, C), K settings of one sampler
        (or K methods) on the same noise and labels (a Skip-Tuning sweep); each is evaluated
        on its own.
      baseline: with ``settings``, the index of the setting the others are compared with
        (e.g. the plain sampler): each dict then also holds ``{name}_diff``, its distance
        minus the baseline's, and that difference's ``level`` interval from the paired
        jackknife (:func:`difflax.metrics.frechet_difference_interval`, the same 25 groups
        of samples left out of both) as ``{name}_diff_ci_low`` / ``_ci_high``.
      store: a folder in which every drawn batch is kept (:class:`difflax.metrics.SampleStore`,
        in a subfolder named after ``store_tag``), so that an interrupted evaluation, run
        again, draws only the missing batches and returns the same result. ``store_tag``
        names the cell (model, sampler, plan, ...); a subfolder of the same name written with
        another key, count, batch size or settings is an error.
    Returns:
      ``{name: distance, ..., "class_accuracy": float (if labels), "num_samples": n}``,
      plus the intervals' ends if ``bootstrap``; with ``settings``, a list of K such dicts.
    """
    if num_samples < 2:
        raise ValueError("need at least 2 samples for covariance statistics")
    if baseline is not None and not 0 <= baseline < (settings or 0):
        raise ValueError(f"baseline {baseline} must index one of the settings (0 .. K - 1, "
                         f"settings K = {settings})")
    keep = bool(bootstrap) or baseline is not None
    streams = [_Stream(len(frechet_metrics)) for _ in range(settings or 1)]
    done = 0
    num_batches = -(-num_samples // batch_size)
    kept = None if store is None else SampleStore(
        store, store_tag, num_samples=num_samples, batch_size=batch_size, settings=settings,
        key=SampleStore.key_data(key))
    with tqdm(total=num_samples, disable=not progress, unit="img", desc="evaluate") as bar:
        for i in range(num_batches):
            draw = lambda i=i: _split_batch(sample_fn(jax.random.fold_in(key, i), batch_size))  # noqa: E731
            images, labels = draw() if kept is None else kept.batch(i, draw)
            take = min(batch_size, num_samples - done)
            for j, stream in enumerate(streams):
                stream.add((images if settings is None else images[j])[:take], labels, take,
                           frechet_metrics, classify_fn, keep)
            done += take
            bar.update(take)
    ci_key = jax.random.fold_in(key, num_batches)
    results = [stream.results(frechet_metrics, done, frechet_method, bootstrap, level, ci_key)
               for stream in streams]
    if baseline is not None:
        _add_differences(results, streams, baseline, frechet_metrics, level, ci_key)
    return results[0] if settings is None else results


def _add_differences(results, streams, baseline, frechet_metrics, level, ci_key):
    """Each setting's distance minus the baseline's, with its paired-jackknife interval."""
    for j, metric in enumerate(frechet_metrics):
        base = np.concatenate(streams[baseline].kept[j])
        for result, stream in zip(results, streams):
            result[f"{metric.name}_diff"] = result[metric.name] - results[baseline][metric.name]
            _add_interval(result, f"{metric.name}_diff", frechet_difference_interval(
                np.concatenate(stream.kept[j]), base, metric.mu, metric.sigma, key=ci_key,
                groups=min(25, len(base)), level=level))


class _Stream:
    """Running statistics of one stream of samples: per metric, and the class hits."""

    def __init__(self, num_metrics: int):
        self.stats = [None] * num_metrics
        self.kept = [[] for _ in range(num_metrics)]  # features, for the intervals
        self.hits = []  # (B,) bools per labelled batch

    def add(self, images, labels, take, frechet_metrics, classify_fn, keep):
        for j, metric in enumerate(frechet_metrics):
            feats = np.asarray(metric.feature_fn(images), np.float64)
            self.stats[j] = _frechet.update_stats(
                self.stats[j] or _frechet.init_stats(feats.shape[1]), feats)
            if keep:
                self.kept[j].append(feats)
        if labels is not None and classify_fn is not None:
            pred = np.asarray(jnp.argmax(classify_fn(images), axis=-1))
            self.hits.append(pred == np.asarray(labels)[:take])

    def results(self, frechet_metrics, done, frechet_method, bootstrap, level, ci_key):
        results: dict[str, float] = {}
        for metric, s, feats in zip(frechet_metrics, self.stats, self.kept):
            mu, sigma = _frechet.stats_mean_cov(s)
            results[metric.name] = _frechet.frechet_distance(mu, sigma, metric.mu, metric.sigma,
                                                             method=frechet_method)
            if bootstrap:
                _add_interval(results, metric.name, frechet_jackknife_interval(
                    np.concatenate(feats), metric.mu, metric.sigma, key=ci_key,
                    groups=min(25, done), level=level))
        if self.hits:
            hits = np.concatenate(self.hits)
            results["class_accuracy"] = float(hits.mean())
            if bootstrap:
                _add_interval(results, "class_accuracy", bootstrap_interval(
                    lambda idx: hits[idx].mean(), len(hits), key=ci_key,
                    num_resamples=bootstrap, level=level))
        results["num_samples"] = done
        return results


def _add_interval(results, name, interval):
    results[f"{name}_ci_low"], results[f"{name}_ci_high"] = interval


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
    return FrechetMetric("fd_digits", _at_resolution("fd_digits", resolution,
                                                     lambda x: digits_features(classifier_params, x)),
                         mu, sigma)


def evaluate_digits(sample_fn: SampleFn, *, key: jax.Array, num_samples: int, batch_size: int,
                    resolution: int = 16, cache_dir: str | None = None, progress: bool = True,
                    bootstrap: int = 200, settings: int | None = None,
                    baseline: int | None = None, store: str | None = None,
                    store_tag: str = "") -> dict[str, float] | list[dict[str, float]]:
    """``fd_digits`` (and ``class_accuracy`` if ``sample_fn`` returns labels) of a digits model.

    The classifier comes from the cache (trained in seconds if absent, see
    :func:`difflax.metrics.load_digits_classifier`). The result also holds the classifier's
    held-out accuracy on real digits, ``digits_classifier_test_accuracy``, as the ceiling
    that ``class_accuracy`` is to be read against, and 95% bootstrap intervals
    (``fd_digits_ci_low`` / ``_ci_high``, ``class_accuracy_ci_low`` / ``_ci_high``) from
    ``bootstrap`` resamples of the samples (0: none). ``settings`` and ``baseline``: K
    methods on the same noise and labels, each compared with one of them; ``store`` /
    ``store_tag``: the drawn batches kept for a resumable run; see :func:`evaluate_samples`.
    """
    clf = load_digits_classifier(cache_dir)
    return _evaluate_with_classifier(
        sample_fn, digits_frechet_metric(clf.params, resolution),
        lambda x: digits_logits(clf.params, x), {"digits_classifier_test_accuracy": clf.test_accuracy},
        key=key, num_samples=num_samples, batch_size=batch_size, progress=progress,
        bootstrap=bootstrap, settings=settings, baseline=baseline, store=store,
        store_tag=store_tag)


def mnist_frechet_metric(classifier_params, resolution: int) -> FrechetMetric:
    """``fd_mnist``: Frechet distance in the MNIST classifier's 64-d feature space to the
    10,000 MNIST test digits at ``resolution`` (see :mod:`difflax.metrics.mnist_features`)."""
    mu, sigma = mnist_reference_stats(classifier_params, resolution)
    return FrechetMetric("fd_mnist", _at_resolution("fd_mnist", resolution,
                                                    lambda x: mnist_features(classifier_params, x)),
                         mu, sigma)


def evaluate_mnist(sample_fn: SampleFn, *, key: jax.Array, num_samples: int, batch_size: int,
                   resolution: int = 32, cache_dir: str | None = None, progress: bool = True,
                   bootstrap: int = 200, settings: int | None = None,
                   baseline: int | None = None, store: str | None = None,
                   store_tag: str = "") -> dict[str, float] | list[dict[str, float]]:
    """``fd_mnist`` (and ``class_accuracy`` if ``sample_fn`` returns labels) of an MNIST model.

    As :func:`evaluate_digits`, with the MNIST CNN (from the cache, or trained once in about
    4 minutes, :func:`difflax.metrics.load_mnist_classifier`) and the 10k test digits as the
    reference; ``mnist_classifier_test_accuracy`` is its accuracy on those test digits.
    """
    clf = load_mnist_classifier(cache_dir)
    return _evaluate_with_classifier(
        sample_fn, mnist_frechet_metric(clf.params, resolution),
        lambda x: mnist_logits(clf.params, x), {"mnist_classifier_test_accuracy": clf.test_accuracy},
        key=key, num_samples=num_samples, batch_size=batch_size, progress=progress,
        bootstrap=bootstrap, settings=settings, baseline=baseline, store=store,
        store_tag=store_tag)


def _at_resolution(name, resolution, feature_fn):
    """feature_fn, refusing images at another resolution than the reference's."""

    def checked(images):
        if images.shape[1:3] != (resolution, resolution):
            raise ValueError(f"{name} reference is at {resolution}x{resolution}, "
                             f"samples are {images.shape[1]}x{images.shape[2]}")
        return feature_fn(images)

    return checked


def _evaluate_with_classifier(sample_fn, metric, logits_fn, extra, **kwargs):
    results = evaluate_samples(sample_fn, frechet_metrics=[metric], classify_fn=logits_fn, **kwargs)
    if isinstance(results, list):
        return [{**r, **extra} for r in results]
    return {**results, **extra}


class DatasetMetric(NamedTuple):
    """How the samples of a model trained on one dataset are scored.

    Attributes:
      name: the Frechet distance's name and result key ("fd_digits", "fd_mnist").
      evaluate: :func:`evaluate_digits` or :func:`evaluate_mnist`.
      load_classifier: ``(cache_dir=None) -> TrainedClassifier``, the cached feature network.
      frechet_metric: ``(classifier_params, resolution) -> FrechetMetric``.
      logits: ``(classifier_params, images (B, H, W, C)) -> (B, 10)``.
      features: ``(classifier_params, images) -> (B, 64)``, the distance's feature space.
    """

    name: str
    evaluate: Callable
    load_classifier: Callable
    frechet_metric: Callable
    logits: Callable
    features: Callable


DATASET_METRICS = {
    "digits": DatasetMetric("fd_digits", evaluate_digits, load_digits_classifier,
                            digits_frechet_metric, digits_logits, digits_features),
    "mnist": DatasetMetric("fd_mnist", evaluate_mnist, load_mnist_classifier,
                           mnist_frechet_metric, mnist_logits, mnist_features),
}


def dataset_metric(dataset: str) -> DatasetMetric:
    """The metric of a model trained on ``dataset`` (a run's ``config.data.name``)."""
    if dataset not in DATASET_METRICS:
        raise ValueError(f"no built-in metric for dataset {dataset!r}; valid: "
                         f"{', '.join(DATASET_METRICS)} (others: inception_frechet_metric)")
    return DATASET_METRICS[dataset]


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
