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
- :func:`frechet_difference_interval`: the same jackknife for the difference of two Frechet
  distances from paired samples (a method and the plain sampler on the same noise and
  labels), leaving the same group out of both.
- :func:`mean_interval`: mean and Student-t interval over independent runs (e.g. seeds).
- :func:`claim_verdict`: a paper's claim judged from an effect and its interval.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
import scipy.stats

from difflax.metrics.frechet import frechet_distance, mean_cov

__all__ = ["CLAIMS", "bootstrap_interval", "claim_verdict", "format_interval",
           "frechet_difference_interval", "frechet_jackknife_interval", "mean_interval"]


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
    feats = np.asarray(features, np.float64)
    fd = lambda keep: frechet_distance(*mean_cov(keep(feats)), mu, sigma, method="eigh")
    return _jackknife(fd, len(feats), key=key, groups=groups, level=level)


def frechet_difference_interval(features, base_features, mu, sigma, *, key: jax.Array,
                                groups: int = 25, level: float = 0.95) -> tuple[float, float]:
    """(low, high) interval of FD(``features``) - FD(``base_features``), both Frechet distances
    to the reference N(``mu`` (D,), ``sigma`` (D, D)), from paired samples.

    Row i of ``features`` and of ``base_features`` (both (N, D)) come from the same noise and
    label (a method and the plain sampler it accelerates or tunes), so their distances share
    most of their sampling noise. The delete-a-group jackknife (Efron & Tibshirani 1993,
    Sec. 11.5) leaves the same group of rows out of both sets and recomputes the difference;
    the interval is centred on the all-sample difference, ``-+ t_{(1+level)/2, G-1} * se``.
    Identical sets give [0, 0]; sets that differ by a constant shift ``delta`` of the
    features give an interval centred on ``2 delta.(mean - mu) + |delta|^2``, the exact
    difference (the covariances are equal)."""
    a = np.asarray(features, np.float64)
    b = np.asarray(base_features, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need feature arrays of one shape, got {a.shape} "
                         f"and {b.shape}")
    fd = lambda f: frechet_distance(*mean_cov(f), mu, sigma, method="eigh")
    return _jackknife(lambda keep: fd(keep(a)) - fd(keep(b)), len(a), key=key, groups=groups,
                      level=level)


def _jackknife(statistic, n, *, key, groups, level):
    """(low, high): delete-a-group jackknife interval of ``statistic(keep)``, where ``keep``
    maps an (N, ...) array to its rows outside the left-out group (all rows: the estimate)."""
    _check_level(level)
    if not 2 <= groups <= n:
        raise ValueError(f"the jackknife needs 2 <= groups <= n samples, got groups={groups}, n={n}")
    order = np.asarray(jax.random.permutation(key, n))
    left_out = [statistic(lambda x, idx=idx: np.delete(x, idx, axis=0))
                for idx in np.array_split(order, groups)]
    se = float(np.sqrt((groups - 1) / groups * np.sum((left_out - np.mean(left_out)) ** 2)))
    half = float(scipy.stats.t.ppf((1 + level) / 2, groups - 1)) * se
    estimate = statistic(lambda x: x)
    return estimate - half, estimate + half


CLAIMS = ("lower", "no_worse")


def claim_verdict(effect: float, interval: tuple[float, float], claim: str, *,
                  tolerance: float = 0.0) -> str:
    """A paper's claim about a method, judged from the method's effect on a distance (lower
    is better): its value minus the plain sampler's (``effect``) and that difference's
    interval ``(low, high)`` (:func:`frechet_difference_interval`).

    ``claim`` is what the paper says the method does to the distance:

    - ``"lower"`` (the method improves quality, e.g. Skip-Tuning): **holds** if the whole
      interval is below 0 (``high < 0``); **holds partly** if the effect is below 0 but the
      interval reaches 0 or above; **does not hold here** if the effect is >= 0.
    - ``"no_worse"`` (a speed-up at the same quality, e.g. feature reuse, pruned students):
      the method may lose at most ``tolerance`` (>= 0, in the distance's units). **Holds** if
      the whole interval is at or below the tolerance (``high <= tolerance``); **holds
      partly** if the interval straddles it (``low <= tolerance < high``: the data allow the
      claim but do not show it); **does not hold here** if the whole interval is above it
      (``low > tolerance``).

    Returns "holds", "holds partly" or "does not hold here".
    """
    low, high = interval
    if claim == "lower":
        return "holds" if high < 0 else "holds partly" if effect < 0 else "does not hold here"
    if claim == "no_worse":
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        return ("holds" if high <= tolerance else "holds partly" if low <= tolerance
                else "does not hold here")
    raise ValueError(f"unknown claim {claim!r}; valid claims: {', '.join(CLAIMS)}")


def format_interval(value: float, low: float, high: float, *, digits: int = 3,
                    signed: bool = False) -> str:
    """``"value [low, high]"`` with ``digits`` decimals, an estimate and its interval as the
    experiments' tables show them; ``signed`` writes a + before positive numbers (for
    differences: ``"+0.120 [-0.010, +0.250]"``)."""
    f = f"{{:{'+' if signed else ''}.{digits}f}}".format
    return f"{f(value)} [{f(low)}, {f(high)}]"


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
