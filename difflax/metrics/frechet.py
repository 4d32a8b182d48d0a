"""Frechet distance between Gaussian fits of feature sets, with streaming statistics.

The Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2) is

    d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})

(Dowson & Landau 1982; used as FID by Heusel et al. 2017, eq. 6). Everything here runs in
float64 numpy on the host, exactly as pytorch-fid does: feature statistics are accumulated
batch by batch (Chan et al.'s pairwise update of mean and scatter matrix), so 50,000
feature vectors never need to be held in memory at once.

Statistics files use the ``.npz`` layout of pytorch-fid and EDM (keys ``mu`` and ``sigma``),
so published reference statistics load as they are.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import scipy.linalg

__all__ = [
    "FeatureStats",
    "init_stats",
    "update_stats",
    "merge_stats",
    "stats_mean_cov",
    "mean_cov",
    "frechet_distance",
    "save_stats",
    "load_stats",
]


class FeatureStats(NamedTuple):
    """Running statistics of feature vectors of dimension D.

    Attributes:
      count: number of vectors seen so far (python int).
      mean: (D,) float64 running mean.
      scatter: (D, D) float64 sum of outer products of deviations from the mean
        (so the unbiased covariance is ``scatter / (count - 1)``).
    """

    count: int
    mean: np.ndarray
    scatter: np.ndarray


def init_stats(dim: int) -> FeatureStats:
    """Empty statistics for D = ``dim`` dimensional features."""
    return FeatureStats(0, np.zeros((dim,), np.float64), np.zeros((dim, dim), np.float64))


def _batch_stats(features) -> FeatureStats:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {x.shape}")
    mean = x.mean(axis=0)
    centred = x - mean
    return FeatureStats(x.shape[0], mean, centred.T @ centred)


def merge_stats(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    """Statistics of the union of two disjoint feature sets (Chan, Golub & LeVeque 1979)."""
    if a.count == 0:
        return b
    if b.count == 0:
        return a
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    scatter = a.scatter + b.scatter + np.outer(delta, delta) * (a.count * b.count / n)
    return FeatureStats(n, mean, scatter)


def update_stats(stats: FeatureStats, features) -> FeatureStats:
    """Adds a batch of features, shape (N, D) (any array type), to ``stats``."""
    return merge_stats(stats, _batch_stats(features))


def stats_mean_cov(stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma): the mean (D,) and unbiased covariance (D, D), as ``np.cov(rowvar=False)``."""
    if stats.count < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {stats.count}")
    return stats.mean.copy(), stats.scatter / (stats.count - 1)


def mean_cov(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a full (N, D) feature array in one go (float64)."""
    return stats_mean_cov(_batch_stats(features))


def _trace_sqrt_product_sqrtm(sigma1, sigma2, eps):
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return np.trace(covmean)


def _trace_sqrt_product_eigh(sigma1, sigma2):
    # sigma1 sigma2 is similar to the symmetric PSD s^(1/2) sigma2 s^(1/2), s = sigma1
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root @ sigma2 @ root)
    return np.sum(np.sqrt(np.clip(lam, 0, None)))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``method="sqrtm"`` (default) follows pytorch-fid's ``calculate_frechet_distance``: the
    matrix square root is ``scipy.linalg.sqrtm(sigma1 @ sigma2)``; if it is not finite
    (singular product), ``eps`` is added to both diagonals; a negligible imaginary part
    from numerical error is dropped. ``method="eigh"`` computes the same trace from the
    eigenvalues of the symmetric sigma1^(1/2) sigma2 sigma1^(1/2): equal up to rounding for
    well-conditioned covariances and about 3x faster at D = 2048 (about 14 s instead of
    40-90 s on a loaded 2-core CPU).

    Args:
      mu1, mu2: (D,) means.
      sigma1, sigma2: (D, D) covariances.
      eps: diagonal offset used only when the product is numerically singular ("sqrtm").
      method: "sqrtm" or "eigh".
    Returns:
      The distance as a python float.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean shapes differ: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"covariance shapes {sigma1.shape}, {sigma2.shape} do not fit mean {mu1.shape}")

    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def save_stats(path: str | os.PathLike, mu, sigma) -> None:
    """Writes reference statistics as ``.npz`` with keys ``mu`` (D,) and ``sigma`` (D, D)."""
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads (mu, sigma) from a pytorch-fid / EDM style ``.npz`` file (float64)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"reference statistics {path!r} not found; use a published pytorch-fid / EDM .npz "
            "(keys 'mu' and 'sigma', e.g. EDM's https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/) "
            "or write one with difflax.metrics.save_stats"
        )
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise KeyError(f"{path!r} has keys {sorted(f.keys())}, expected 'mu' and 'sigma'")
        return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
