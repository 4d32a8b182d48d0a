"""Error bars: bootstrap intervals over samples and t-intervals over seeds.

- :func:`bootstrap_interval`: the percentile bootstrap (Efron & Tibshirani 1993, Sec. 13.3):
  resample the N samples with replacement ``num_resamples`` times, recompute the statistic,
  and take the (1 - level) / 2 and (1 + level) / 2 quantiles. Deterministic in its key.
- :func:`frechet_bootstrap_interval`: that interval for a Frechet distance to fixed reference
  statistics. It measures the spread of the N-sample estimate, not the estimate's upward bias
  at small N (compare with real data at the same N for that, e.g.
  ``experiments/fd_digits_baseline.py``).
- :func:`mean_interval`: mean and Student-t interval over independent runs (e.g. seeds).
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
import scipy.stats

from difflax.metrics.frechet import frechet_distance, mean_cov

__all__ = ["bootstrap_interval", "frechet_bootstrap_interval", "mean_interval"]


def _check_level(level):
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n: int, *, key: jax.Array,
                       num_resamples: int = 200, level: float = 0.95) -> tuple[float, float]:
    """(low, high) percentile-bootstrap interval of ``statistic`` over n samples.

    ``statistic(idx)`` computes the statistic of the samples at indices ``idx`` (n,) (with
    repeats); it is called once per resample, with indices drawn uniformly by ``key``.
    """
    _check_level(level)
    if n < 2 or num_resamples < 2:
        raise ValueError(f"bootstrap needs n >= 2 samples and >= 2 resamples, got {n}, {num_resamples}")
    indices = np.asarray(jax.random.randint(key, (num_resamples, n), 0, n))
    values = np.array([statistic(idx) for idx in indices], np.float64)
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def frechet_bootstrap_interval(features, mu, sigma, *, key: jax.Array, num_resamples: int = 200,
                               level: float = 0.95) -> tuple[float, float]:
    """(low, high) bootstrap interval of the Frechet distance between the Gaussian fit of
    ``features`` (N, D) and the reference N(``mu`` (D,), ``sigma`` (D, D)) (``eigh`` method)."""
    feats = np.asarray(features, np.float64)
    return bootstrap_interval(
        lambda idx: frechet_distance(*mean_cov(feats[idx]), mu, sigma, method="eigh"),
        len(feats), key=key, num_resamples=num_resamples, level=level)


def mean_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of independent values (k,) (e.g. one metric over k seeds)
    and its Student-t interval, mean -+ t_{(1+level)/2, k-1} s / sqrt(k)."""
    _check_level(level)
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size < 2:
        raise ValueError(f"an interval over runs needs at least 2 values, got {v.size}")
    mean = float(v.mean())
    half = float(scipy.stats.t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return mean, mean - half, mean + half
