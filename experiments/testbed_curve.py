"""A testbed's training curve: the loss from metrics.jsonl, and the Frechet distance and class
accuracy of the EMA weights at chosen checkpoints, with intervals (README, "The MNIST
testbed").

For each step in --steps (default: every 1000 steps that has a checkpoint, and the newest),
the run's checkpoint of that step is loaded (`difflax.workdir.load_run(..., step=)`) and
--num samples of its config's first evaluation sampler (EDM Heun, 18 steps, 35 NFE for
configs/mnist_edm.py) are scored by the dataset's metric (`difflax.metrics.dataset_metric`:
fd_mnist on MNIST, fd_digits on the digits), the same noise and labels at every step. Writes
OUT/curve.png (loss and distance against steps), OUT/table.md (printed too), OUT/results.json.
Drawn batches are kept under --store (`difflax.metrics.SampleStore`): an interrupted run resumes.

    python experiments/testbed_curve.py --workdir runs/mnist --out experiments/results/testbed_mnist
        [--steps 1000 2000 ...] [--num 2000] [--batch 250]
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from difflax import configs  # noqa: E402
from difflax.metrics import dataset_metric, fingerprint, format_interval  # noqa: E402
from difflax.workdir import get_sample_fn, labelled_sample_fn, load_config, load_run  # noqa: E402


def saved_steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def losses(workdir):
    """(steps, mean loss over each logging interval) from metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return np.array([r["step"] for r in records]), np.array([r["loss"] for r in records])


def interval(row, key):
    return format_interval(row[key], row[f"{key}_ci_low"], row[f"{key}_ci_high"])


def evaluate_at(workdir, step, num, batch, store=None):
    config, denoiser, params = load_run(workdir, step=step)
    name, steps = configs.parse_sampler(config.evaluate.samplers[0])
    s = config.sample
    sample, nfe = get_sample_fn(denoiser, sampler=name, steps=steps, sigma_min=s.sigma_min,
                                sigma_max=s.sigma_max)
    metric = dataset_metric(config.data.name)
    result = metric.evaluate(labelled_sample_fn(sample, params, denoiser.net.label_dim),
                             key=jax.random.key(0), num_samples=num, batch_size=batch,
                             resolution=denoiser.net.img_resolution, progress=False,
                             store=store, store_tag=f"{config.data.name} step {step} "
                                                    f"{fingerprint(params)} {name}:{steps}")
    return dict(step=step, sampler=f"{name}:{steps}", nfe=nfe, **result), metric.name


def plot(out_dir, loss_steps, loss, rows, metric):
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(loss_steps, loss, lw=0.8)
    a.set(xlabel="training step", ylabel="EDM loss (mean per logging interval)", yscale="log")
    steps = [r["step"] for r in rows]
    fd = np.array([r[metric] for r in rows])
    err = np.array([[r[metric] - r[f"{metric}_ci_low"] for r in rows],
                    [r[f"{metric}_ci_high"] - r[metric] for r in rows]])
    b.errorbar(steps, fd, yerr=err, marker="o", capsize=3)
    b.set(xlabel="training step", ylabel=f"{metric} (95% interval)", yscale="log")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curve.png"), dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a training run's directory")
    p.add_argument("--out", default="experiments/results/testbed_curve")
    p.add_argument("--steps", type=int, nargs="+", help="checkpoint steps to evaluate")
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--store", default="runs/stores/testbed_curve",
                   help="where drawn batches are kept, so that an interrupted run resumes "
                   "(difflax.metrics.SampleStore); 'none' keeps nothing")
    args = p.parse_args()
    load_config(args.workdir)  # a clear error if it holds no run
    saved = saved_steps(args.workdir)
    steps = args.steps or sorted({s for s in saved if s % 1000 == 0} | {saved[-1]})
    os.makedirs(args.out, exist_ok=True)
    rows, metric = [], None
    for step in steps:
        row, metric = evaluate_at(args.workdir, step, args.num, args.batch,
                                  None if args.store == "none" else args.store)
        rows.append(row)
        print(f"step {step}: {metric} {interval(row, metric)}, class accuracy "
              f"{interval(row, 'class_accuracy')}", flush=True)
    loss_steps, loss = losses(args.workdir)
    plot(args.out, loss_steps, loss, rows, metric)
    lines = [f"{os.path.basename(os.path.normpath(args.workdir))}: {rows[0]['sampler']} "
             f"({rows[0]['nfe']} NFE), {args.num} samples per step, the same noise and labels; "
             "95% intervals", "", f"| step | {metric} | class accuracy |", "|---|---|---|"]
    lines += [f"| {r['step']} | {interval(r, metric)} | "
              f"{interval(r, 'class_accuracy')} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
