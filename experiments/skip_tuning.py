"""Skip-Tuning on the default job's digits model (Ma et al., ICML 2024, Sec. 4-5).

For EDM Heun and DEIS tAB3 at NFE 5, 7, 11, 19, 39: a grid of linear skip schedules
(rho_top = 1, rho_bottom in 0.8..1.1; Sec. 3) is swept in one vmapped call per batch, the
best by fd_digits on a few samples is kept (Sec. 4), and best vs plain are then evaluated on
more samples with fresh noise. Then the denoising loss of real digits per noise level, in
pixel space and in the digits classifier's feature space, for each rho_bottom relative to
the plain model (Sec. 5: pixel loss goes up, feature loss down at intermediate sigma).
Writes table.md, results.json and two PNG plots; prints the table.

    python experiments/skip_tuning.py [--workdir runs/digits] [--small]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from difflax import data
from difflax.accel import denoising_loss_by_sigma, get_sweep_fn, linear_skip_scales, search
from difflax.metrics import (digits_features, digits_frechet_metric, digits_logits,
                             load_digits_classifier)
from difflax.workdir import load_run

NFES = (5, 7, 11, 19, 39)
RHO_TOP = (1.0,)
RHO_BOTTOM = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1)
# name, sampler, steps for an NFE, options for a number of steps (order <= steps - 1)
SAMPLERS = [("EDM Heun", "edm_heun", lambda nfe: (nfe + 1) // 2, lambda steps: {}),
            ("DEIS tAB3", "deis_tab", lambda nfe: nfe, lambda steps: {"order": min(3, steps - 1)})]
FULL = dict(nfes=NFES, rho_bottom=RHO_BOTTOM, search_num=500, eval_num=2000, batch=250,
            loss_images=512, sigmas=np.geomspace(0.01, 80.0, 13))
SMALL = dict(nfes=(5, 11), rho_bottom=(0.8, 0.9, 1.0, 1.1), search_num=64, eval_num=128,
             batch=64, loss_images=64, sigmas=np.geomspace(0.02, 80.0, 6))


def run(workdir, out_dir, p):
    os.makedirs(out_dir, exist_ok=True)
    config, denoiser, params = load_run(workdir)
    variables, net = {"params": params}, denoiser.net
    clf = load_digits_classifier()
    metric = digits_frechet_metric(clf.params, net.img_resolution)
    classify = lambda x: digits_logits(clf.params, x)
    common = dict(metric=metric, num_classes=max(net.label_dim, 1), classify_fn=classify,
                  batch_size=p["batch"])
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
                                 num_samples=p["search_num"], **common)
            sweeps[f"{name} NFE {nfe}"] = table
            plain_r, best_r = search(sweep, variables, {"plain": plain, "best": settings[best]},
                                     key=jax.random.key(1), num_samples=p["eval_num"], **common)[1]
            rows.append(dict(sampler=name, nfe=nfe, best=best, plain=plain_r, tuned=best_r))
            print(f"{name} NFE {nfe}: best {best}, fd_digits {plain_r['fd_digits']:.3f} -> "
                  f"{best_r['fd_digits']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    images, labels = data.load_digits(net.img_resolution)
    idx = np.random.default_rng(0).permutation(len(images))[:p["loss_images"]]
    features = lambda x: digits_features(clf.params, x)
    loss = {b: denoising_loss_by_sigma(denoiser, variables, images[idx], labels[idx],
                                       p["sigmas"], skip_scales=s, feature_fn=features,
                                       key=jax.random.key(2))
            for (_, b), s in sorted({**settings, (1.0, 1.0): plain}.items())}
    table = format_table(rows, sweeps, loss, p)
    print(table)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(rows=[{**r, "best": list(r["best"])} for r in rows],
                       sweeps={k: [{**r, "setting": list(r["setting"])} for r in v]
                               for k, v in sweeps.items()},
                       loss={str(b): {k: v.tolist() for k, v in l.items()}
                             for b, l in loss.items()},
                       settings={k: v for k, v in p.items() if k != "sigmas"}), f, indent=1)
    plot(rows, loss, out_dir)
    return table


def format_table(rows, sweeps, loss, p):
    out = [f"fd_digits (lower is better) of {p['eval_num']} class-conditional samples, plain vs "
           f"skip-tuned (linear schedule, rho_top = 1, rho_bottom picked by fd_digits on "
           f"{p['search_num']} other samples from {list(p['rho_bottom'])}); class accuracy in "
           "brackets.\n", "| sampler | NFE | rho_bottom | plain | skip-tuned |",
           "|---|---|---|---|---|"]
    for r in rows:
        cell = lambda m: f"{m['fd_digits']:.3f} ({100 * m['class_accuracy']:.1f}%)"
        out.append(f"| {r['sampler']} | {r['nfe']} | {r['best'][1]:g} | {cell(r['plain'])} | "
                   f"{cell(r['tuned'])} |")
    out += ["", "Sweeps (fd_digits on the search samples):", "",
            "| sampler, NFE | " + " | ".join(f"{b:g}" for b in p["rho_bottom"]) + " |",
            "|---|" + "---|" * len(p["rho_bottom"])]
    out += [f"| {k} | " + " | ".join(f"{r['fd_digits']:.3f}" for r in v) + " |"
            for k, v in sweeps.items()]
    base = loss[1.0]
    out += ["", f"Denoising loss of {p['loss_images']} real digits per noise level, skip-tuned / "
            "plain (pixel space | digits-classifier feature space); plain's absolute loss in the "
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


def plot(rows, loss, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(SAMPLERS), figsize=(5 * len(SAMPLERS), 4))
    for ax, (name, *_) in zip(np.atleast_1d(axes), SAMPLERS):
        rs = [r for r in rows if r["sampler"] == name]
        nfe = [r["nfe"] for r in rs]
        ax.semilogx(nfe, [r["plain"]["fd_digits"] for r in rs], "o-", label="plain")
        ax.semilogx(nfe, [r["tuned"]["fd_digits"] for r in rs], "s-", label="skip-tuned")
        ax.set(title=name, xlabel="NFE", ylabel="fd_digits")
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
    p.add_argument("--workdir", default="runs/digits")
    p.add_argument("--out", default="experiments/results/skip_tuning")
    p.add_argument("--small", action="store_true", help="two NFEs, a 4-point grid, few samples")
    p.add_argument("--search-num", type=int, help="samples per setting for the search")
    p.add_argument("--eval-num", type=int, help="samples for best vs plain")
    p.add_argument("--rho-bottom", type=float, nargs="+", help="the rho_bottom grid")
    args = p.parse_args()
    settings = dict(SMALL if args.small else FULL)
    for key in ("search_num", "eval_num", "rho_bottom"):
        if getattr(args, key) is not None:
            settings[key] = tuple(getattr(args, key)) if key == "rho_bottom" else getattr(args, key)
    run(args.workdir, args.out, settings)


if __name__ == "__main__":
    main()
