"""The floor of `fd_digits` / `fd_mnist`: random subsets of real data against the reference statistics.

Frechet distances are biased upward at small sample counts, so a sampler's distance is to be
read against real data at the same count. For each count, `--repeats` disjoint-seed random
subsets give the mean and a 95% t-interval over subsets (`difflax.metrics.mean_interval`).

- digits: subsets of the same 1797 images the reference statistics are computed on, so
  these floors are, if anything, optimistic (16x16).
- mnist: subsets of the 60k training digits against the reference, the 10k test digits
  (32x32); the two sets are disjoint, as a model's samples and the reference are.

    python experiments/fd_digits_baseline.py [--dataset digits|mnist] [--repeats 5]
"""
import argparse

import numpy as np

from difflax import data, metrics

SETTINGS = {
    "digits": dict(counts=(250, 500, 1000), resolution=16),
    "mnist": dict(counts=(500, 1000, 2000, 5000), resolution=32),
}


def real_metric_and_images(dataset):
    """(FrechetMetric, real images that are subsampled) of a testbed."""
    r = SETTINGS[dataset]["resolution"]
    m = metrics.dataset_metric(dataset)
    images = data.load_digits(r)[0] if dataset == "digits" else data.load_mnist("train", r)[0]
    return m.frechet_metric(m.load_classifier().params, r), images


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=tuple(SETTINGS), default="digits")
    ap.add_argument("--repeats", type=int, default=5, help="random subsets per count")
    args = ap.parse_args()
    metric, images = real_metric_and_images(args.dataset)
    rng = np.random.default_rng(0)
    print(f"| real samples | {metric.name} (mean over {args.repeats} subsets) | 95% interval |")
    print("|---|---|---|")
    for n in SETTINGS[args.dataset]["counts"]:
        fds = []
        for _ in range(args.repeats):
            idx = rng.choice(len(images), n, replace=False)
            mu, sigma = metrics.mean_cov(np.asarray(metric.feature_fn(images[idx]), np.float64))
            fds.append(metrics.frechet_distance(mu, sigma, metric.mu, metric.sigma))
        mean, low, high = metrics.mean_interval(fds)
        print(f"| {n} | {mean:.3f} | [{low:.3f}, {high:.3f}] |", flush=True)


if __name__ == "__main__":
    main()
