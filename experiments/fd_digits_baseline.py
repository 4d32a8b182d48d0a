"""The floor of `fd_digits`: random subsets of the real digits against the reference statistics.

Frechet distances are biased upward at small sample counts, so a sampler's `fd_digits` is to
be read against real data at the same count. The subsets come from the same 1797 images
the reference statistics are computed on, so these floors are, if anything, optimistic.

    python experiments/fd_digits_baseline.py
"""
import numpy as np

from difflax import data, metrics


def main():
    clf = metrics.load_digits_classifier()
    metric = metrics.digits_frechet_metric(clf.params, 16)
    images, _ = data.load_digits(16)
    rng = np.random.default_rng(0)
    print("| real samples | fd_digits |\n|---|---|")
    for n in (250, 500, 1000):
        idx = rng.choice(len(images), n, replace=False)
        mu, sigma = metrics.mean_cov(np.asarray(metric.feature_fn(images[idx]), np.float64))
        print(f"| {n} | {metrics.frechet_distance(mu, sigma, metric.mu, metric.sigma):.3f} |")


if __name__ == "__main__":
    main()
