"""Skip-Tuning on any testbed's model (Ma et al., ICML 2024, Sec. 4-5), with error bars.

For EDM Heun and UniPC at NFE 9, 13, 19, 39: a grid of linear skip schedules (rho_top = 1,
rho_bottom in the paper's range 0.6..1.0; Sec. 3) is swept in one vmapped call per batch, the
best by the dataset's Frechet distance (fd_digits or fd_mnist, `difflax.metrics.dataset_metric`)
on one sample set is kept (Sec. 4), and best vs plain are then evaluated on another set (fresh
noise, >= 2000 samples): each distance with its jackknife interval, the difference
tuned - plain with the paired jackknife interval (same noise and labels), and the verdict on
the paper's claim (the tuned sampler has a lower distance; `difflax.metrics.claim_verdict`).
Then the denoising loss of real images per noise level, in pixel space and in the dataset
classifier's feature space, for each rho_bottom relative to the plain model (Sec. 5: pixel
loss goes up, feature loss down at intermediate sigma).
Writes table.md, results.json and two PNG plots; prints the table. Every drawn batch is kept
under --store (default runs/stores/skip_tuning), so a run that is interrupted (hours on the
MNIST testbed) resumes where it stopped when started again with the same arguments.

    python experiments/skip_tuning.py [--workdir runs/digits | /tmp/testbed | mnist_edm] [--small]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import numpy as np

from difflax import data
from difflax.accel import (denoising_loss_by_sigma, get_sweep_fn, linear_skip_scales, search,
                           stack_skip_scales)
from difflax.metrics import (claim_verdict, dataset_metric, evaluate_samples, fingerprint,
                             format_interval)
from difflax.workdir import load_run

NFES = (9, 13, 19, 39)
RHO_TOP = (1.0,)
RHO_BOTTOM = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
# name, sampler, steps for an NFE, options for a number of steps
SAMPLERS = [("EDM Heun", "edm_heun", lambda nfe: (nfe + 1) // 2, lambda steps: {}),
            ("UniPC", "unipc", lambda nfe: nfe, lambda steps: {})]
FULL = dict(nfes=NFES, rho_bottom=RHO_BOTTOM, search_num=500, eval_num=2000, batch=250,
            loss_images=512, sigmas=np.geomspace(0.01, 80.0, 13))
SMALL = dict(nfes=(9,), rho_bottom=(0.6, 0.8, 1.0), search_num=64, eval_num=128,
             batch=64, loss_images=64, sigmas=np.geomspace(0.02, 80.0, 6))


def load_images(name, resolution):
    """Real images and labels of the run's dataset, for the loss analysis."""
    if name == "mnist":
        return data.load_mnist("test", resolution)
    return data.load_digits(resolution)


def run(workdir, out_dir, p, store=None):
    os.makedirs(out_dir, exist_ok=True)
    config, denoiser, params = load_run(workdir)
    model_tag = f"{config.data.name} {fingerprint(params)}"  # a cell's batches, for --store
    variables, net = {"params": params}, denoiser.net
    dm = dataset_metric(config.data.name)
    clf = dm.load_classifier()
    metric = dm.frechet_metric(clf.params, net.img_resolution)
    classify = functools.partial(dm.logits, clf.params)
    num_classes = max(net.label_dim, 1)
    settings = {(t, b): linear_skip_scales(net, t, b) for t in RHO_TOP for b in p["rho_bottom"]}
    plain = linear_skip_scales(net, 1.0, 1.0)
    rows, sweeps = [], {}
    for name, sampler, steps_of, options_of in SAMPLERS:
        for nfe in p["nfes"]:
            t0, steps = time.time(), steps_of(nfe)
            sweep, used = get_sweep_fn(denoiser, sampler=sampler, steps=steps,
                                       sigma_min=config.sample.sigma_min,
                                       sigma_max=config.sample.sigma_max, **options_of(steps))
            assert used == nfe, (name, nfe, used)
            best, table = search(sweep, variables, settings, key=jax.random.key(0),
                                 num_samples=p["search_num"], metric=metric,
                                 num_classes=num_classes, classify_fn=classify,
                                 batch_size=p["batch"], store=store,
                                 store_tag=f"{model_tag} search {name} {nfe} {sorted(settings)}")
            sweeps[f"{name} NFE {nfe}"] = table
            pair = stack_skip_scales([plain, settings[best]])

            def sample_fn(key, n, sweep=sweep, pair=pair):
                labels = jax.random.randint(jax.random.fold_in(key, 1), (n,), 0, num_classes)
                return sweep(variables, pair, key, labels), labels

            plain_r, best_r = evaluate_samples(
                sample_fn, key=jax.random.key(1), num_samples=p["eval_num"],
                batch_size=p["batch"], frechet_metrics=[metric], classify_fn=classify,
                progress=False, frechet_method="eigh", bootstrap=200, settings=2, baseline=0,
                store=store, store_tag=f"{model_tag} eval {name} {nfe} {best}")
            rows.append(dict(sampler=name, nfe=nfe, best=best, plain=plain_r, tuned=best_r,
                             verdict=verdict(best_r, metric.name)))
            print(f"{name} NFE {nfe}: best {best}, {metric.name} {plain_r[metric.name]:.3f} -> "
                  f"{best_r[metric.name]:.3f}, {rows[-1]['verdict']} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    images, labels = load_images(config.data.name, net.img_resolution)
    idx = np.random.default_rng(0).permutation(len(images))[:p["loss_images"]]
    features = functools.partial(dm.features, clf.params)
    loss = {b: denoising_loss_by_sigma(denoiser, variables, images[idx], labels[idx],
                                       p["sigmas"], skip_scales=s, feature_fn=features,
                                       key=jax.random.key(2))
            for (_, b), s in sorted({**settings, (1.0, 1.0): plain}.items())}
    table = format_table(rows, sweeps, loss, p, metric.name, workdir)
    print(table)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(workdir=workdir, metric=metric.name,
                       rows=[{**r, "best": list(r["best"])} for r in rows],
                       sweeps={k: [{**r, "setting": list(r["setting"])} for r in v]
                               for k, v in sweeps.items()},
                       loss={str(b): {k: v.tolist() for k, v in l.items()}
                             for b, l in loss.items()},
                       settings={k: v for k, v in p.items() if k != "sigmas"}), f, indent=1)
    plot(rows, loss, out_dir, metric.name)
    return table


def verdict(tuned, name):
    """The paper's claim, the tuned sampler's distance is lower than the plain one's."""
    return claim_verdict(tuned[f"{name}_diff"],
                         (tuned[f"{name}_diff_ci_low"], tuned[f"{name}_diff_ci_high"]), "lower")


def cell(r, name):
    return format_interval(r[name], r[f"{name}_ci_low"], r[f"{name}_ci_high"])


def format_table(rows, sweeps, loss, p, name, workdir):
    out = [f"Model: {workdir}. {name} (lower is better) of {p['eval_num']} class-conditional "
           f"samples with its 95% jackknife interval, plain vs skip-tuned (linear schedule, "
           f"rho_top = 1, rho_bottom picked by {name} on {p['search_num']} other samples from "
           f"{list(p['rho_bottom'])}); tuned - plain on the same noise and labels with its "
           "paired-jackknife interval; class accuracy in brackets. Verdict on the paper's claim "
           "(the tuned sampler is better): holds if the whole interval of the difference is "
           "below 0, holds partly if only the estimate is.\n",
           "| sampler | NFE | rho_bottom | plain | skip-tuned | tuned - plain | verdict |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["tuned"]
        acc = lambda m: f" ({100 * m['class_accuracy']:.1f}%)"
        diff = format_interval(t[f"{name}_diff"], t[f"{name}_diff_ci_low"],
                               t[f"{name}_diff_ci_high"], signed=True)
        out.append(f"| {r['sampler']} | {r['nfe']} | {r['best'][1]:g} | "
                   f"{cell(r['plain'], name)}{acc(r['plain'])} | {cell(t, name)}{acc(t)} | "
                   f"{diff} | {r['verdict']} |")
    out += ["", f"Sweeps ({name} on the search samples):", "",
            "| sampler, NFE | " + " | ".join(f"{b:g}" for b in p["rho_bottom"]) + " |",
            "|---|" + "---|" * len(p["rho_bottom"])]
    out += [f"| {k} | " + " | ".join(f"{r[name]:.3f}" for r in v) + " |"
            for k, v in sweeps.items()]
    base = loss[1.0]
    out += ["", f"Denoising loss of {p['loss_images']} real images per noise level, skip-tuned / "
            f"plain (pixel space | {name} classifier's feature space); plain's absolute loss in the "
            "last row.", "",
            "| rho_bottom | " + " | ".join(f"sigma {s:.3g}" for s in base["sigma"]) + " |",
            "|---|" + "---|" * len(base["sigma"])]
    for b, l in loss.items():
        if b != 1.0:
            out.append(f"| {b:g} | " + " | ".join(
                f"{x:.3f} \\| {y:.3f}" for x, y in zip(l["pixel"] / base["pixel"],
                                                      l["feature"] / base["feature"])) + " |")
    out.append("| plain (abs.) | " + " | ".join(
        f"{x:.3g} \\| {y:.3g}" for x, y in zip(base["pixel"], base["feature"])) + " |")
    return "\n".join(out) + "\n"


def plot(rows, loss, out_dir, name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(SAMPLERS), figsize=(5 * len(SAMPLERS), 4))
    for ax, (sampler, *_) in zip(np.atleast_1d(axes), SAMPLERS):
        rs = [r for r in rows if r["sampler"] == sampler]
        nfe = [r["nfe"] for r in rs]
        for key, marker, text in (("plain", "o-", "plain"), ("tuned", "s-", "skip-tuned")):
            ms = [r[key] for r in rs]
            err = [[m[name] - m[f"{name}_ci_low"] for m in ms],
                   [m[f"{name}_ci_high"] - m[name] for m in ms]]
            ax.errorbar(nfe, [m[name] for m in ms], yerr=err, fmt=marker, capsize=3, label=text)
        ax.set(title=sampler, xlabel="NFE", ylabel=name, xscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fd_vs_nfe.png"), dpi=120)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    base = loss[1.0]
    for ax, space in zip(axes, ("pixel", "feature")):
        for b, l in loss.items():
            if b != 1.0:
                ax.semilogx(l["sigma"], l[space] / base[space], "o-", label=f"rho_bottom {b:g}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(title=f"{space}-space denoising loss / plain", xlabel="sigma")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss_by_sigma.png"), dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/digits",
                   help="a training run, an exported testbed folder or a shipped testbed name")
    p.add_argument("--out", default="experiments/results/skip_tuning")
    p.add_argument("--small", action="store_true", help="one NFE, a 3-point grid, few samples")
    p.add_argument("--search-num", type=int, help="samples per setting for the search")
    p.add_argument("--eval-num", type=int, help="samples for best vs plain")
    p.add_argument("--rho-bottom", type=float, nargs="+", help="the rho_bottom grid")
    p.add_argument("--store", default="runs/stores/skip_tuning",
                   help="where drawn batches are kept, so that an interrupted run resumes "
                   "(difflax.metrics.SampleStore); 'none' keeps nothing")
    args = p.parse_args()
    settings = dict(SMALL if args.small else FULL)
    for key in ("search_num", "eval_num", "rho_bottom"):
        if getattr(args, key) is not None:
            settings[key] = tuple(getattr(args, key)) if key == "rho_bottom" else getattr(args, key)
    run(args.workdir, args.out, settings, None if args.store == "none" else args.store)


if __name__ == "__main__":
    main()
