"""Error bars: bootstrap and jackknife intervals over samples, t-intervals over seeds.

- :func:`bootstrap_interval`: the percentile bootstrap (Efron & Tibshirani 1993, Sec. 13.3):
  resample the N samples with replacement ``num_resamples`` times, recompute the statistic,
  and take the (1 - level) / 2 and (1 + level) / 2 quantiles. Deterministic in its key. Right
  for means (class accuracy); wrong for a Frechet distance, see below.
- :func:`frechet_jackknife_interval`: an interval for a Frechet distance to fixed reference
  statistics from the delete-a-group jackknife (Efron & Tibshirani 1993, Sec. 11.5): split the
  N samples into G random groups, recompute the distance without each group, and take
  ``estimate -+ t_{(1+level)/2, G-1} * se_jack``. A bootstrap does not work here: a resample
  with replacement holds only about 0.63 N distinct samples, and the Frechet distance's upward
  bias grows as the sample count falls, so with many features and few samples the whole
  bootstrap distribution can sit above the estimate. The jackknife's standard error matches
  the spread over independent sample sets within 0.75-1.5x with 32 features and N = 300
  (``tests/test_metrics.py`` checks this), erring on the wide side (the Efron-Stein
  inequality). The interval is for the N-sample estimate, not for the
  infinite-sample distance: read it against real data at the same N
  (``experiments/fd_digits_baseline.py``).
- :func:`mean_interval`: mean and Student-t interval over independent runs (e.g. seeds).
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
import scipy.stats

from difflax.metrics.frechet import frechet_distance, mean_cov

__all__ = ["bootstrap_interval", "frechet_jackknife_interval", "mean_interval"]


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


def frechet_jackknife_interval(features, mu, sigma, *, key: jax.Array, groups: int = 25,
                               level: float = 0.95) -> tuple[float, float]:
    """(low, high) delete-a-group jackknife interval of the Frechet distance between the
    Gaussian fit of ``features`` (N, D) and the reference N(``mu`` (D,), ``sigma`` (D, D))
    (``eigh`` method). The N samples are split into ``groups`` random groups by ``key``; the
    interval is centred on the all-sample distance."""
    _check_level(level)
    feats = np.asarray(features, np.float64)
    n = len(feats)
    if not 2 <= groups <= n:
        raise ValueError(f"the jackknife needs 2 <= groups <= n samples, got groups={groups}, n={n}")
    fd = lambda f: frechet_distance(*mean_cov(f), mu, sigma, method="eigh")
    order = np.asarray(jax.random.permutation(key, n))
    left_out = [fd(np.delete(feats, idx, axis=0)) for idx in np.array_split(order, groups)]
    se = float(np.sqrt((groups - 1) / groups * np.sum((left_out - np.mean(left_out)) ** 2)))
    half = float(scipy.stats.t.ppf((1 + level) / 2, groups - 1)) * se
    estimate = fd(feats)
    return estimate - half, estimate + half


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
