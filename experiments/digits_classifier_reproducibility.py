"""Does the digits classifier behind `fd_digits` come out the same on every machine?

Trains `difflax.metrics.train_digits_classifier` (seeded, one jitted scan) in fresh
processes under different XLA CPU settings: the default, 4 forced host devices (as the test
suite runs), one CPU core, Eigen's thread pool off, and the instruction sets of other CPUs
(`--xla_cpu_max_isa`: AVX2 without AVX-512, AVX and SSE4.2 without FMA). For each it prints
the largest parameter difference from the default and the Frechet distance, in the
classifier's features, of 500 real digits with Gaussian noise (sigma 0.2) to all of them:
the classifier's share of how much `fd_digits` moves between machines.

    python experiments/digits_classifier_reproducibility.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import sys
import numpy as np
from flax import traverse_util
from difflax.metrics import digits_features, train_digits_classifier
from difflax.metrics.digits_features import real_digits
from difflax.metrics.frechet import frechet_distance, mean_cov

clf = train_digits_classifier()
x, _ = real_digits(16)
noisy = np.clip(x[:500] + 0.2 * np.random.default_rng(0).standard_normal(x[:500].shape), -1, 1)
stats = [mean_cov(np.asarray(digits_features(clf.params, a), np.float64)) for a in (noisy, x)]
flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(clf.params).items()}
np.savez(sys.argv[1], fd=frechet_distance(*stats[0], *stats[1]), accuracy=clf.test_accuracy,
         **flat)
"""

SETTINGS = {
    "default": ({}, None),
    "4 host devices": ({"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, None),
    "1 CPU core": ({}, {0}),
    "Eigen threads off": ({"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}, None),
    "max ISA AVX2": ({"XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}, None),
    "max ISA AVX (no FMA)": ({"XLA_FLAGS": "--xla_cpu_max_isa=AVX"}, None),
    "max ISA SSE4.2": ({"XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"}, None),
}


def train_in_child(path: str, env: dict, cpus: set[int] | None) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | env
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    subprocess.run([sys.executable, "-c", CHILD, path], env=full_env, check=True,
                   preexec_fn=preexec, cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
    with np.load(path) as f:
        return {k: np.asarray(f[k]) for k in f.files}


def main():
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: train_in_child(os.path.join(tmp, f"{i}.npz"), *setting)
                for i, (name, setting) in enumerate(SETTINGS.items())}
    ref = runs["default"]
    params = [k for k in ref if k not in ("fd", "accuracy")]
    print("| setting | max abs parameter difference | test accuracy | fd (noisy digits) |")
    print("|---|---|---|---|")
    for name, r in runs.items():
        diff = max(float(np.abs(r[k] - ref[k]).max()) for k in params)
        print(f"| {name} | {diff:.2g} | {float(r['accuracy']):.4f} | {float(r['fd']):.9f} |")


if __name__ == "__main__":
    main()
