"""The samplers compared on any testbed's model at 5-20 NFE, with error bars and a verdict on
each paper's comparison (README, "Samplers on the testbeds").

At each NFE of --nfes (default 5, 10, 15, 20) every sampler below samples the model on its
EDM schedule (sigma_max -> sigma_min, each sampler's default time grid) from the same noise
and labels (`difflax.workdir.paired_sample_fn`), --num samples (default 2000) per cell: the
dataset's Frechet distance (fd_digits or fd_mnist, `difflax.metrics.dataset_metric`) with its
95% jackknife interval and class accuracy. EDM Heun's NFE is odd (2 x steps - 1): it runs at
the largest NFE not above the column's (5, 9, 15, 19), which can only favour its rivals.

Each paper's claim is its sampler's distance is lower than its baseline's at the same NFE,
judged from the paired difference (same noise and labels, `frechet_difference_interval`) by
`difflax.metrics.claim_verdict(..., "lower")`:
  - EDM (Karras et al. 2022, Sec. 3): Heun's 2nd order method beats Euler (DDIM) per NFE;
  - DEIS (Zhang & Chen 2023, Sec. 5): tAB3 beats DDIM;
  - iPNDM (DEIS, Sec. 5 / Liu et al. 2022): beats DDIM;
  - DPM-Solver++ (Lu et al. 2022, Sec. 6): 2M beats DDIM;
  - UniPC (Zhao et al. 2023, Sec. 5): beats DPM-Solver++ 2M, most at the lowest NFE.
The samples of an NFE are drawn once (kept under --store) and scored against each baseline.
Writes table.md, results.json and fd_vs_nfe.png; prints the table.

    python experiments/sampler_comparison.py [--workdir runs/digits | mnist_edm | FOLDER]
        [--nfes 5 10 15 20] [--num 2000] [--out DIR] [--store DIR|none] [--small]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from difflax.metrics import claim_verdict, dataset_metric, fingerprint, format_interval  # noqa: E402
from difflax.workdir import get_sample_fn, load_run, paired_sample_fn  # noqa: E402

# label: (difflax sampler, steps for an NFE)
SAMPLERS = {
    "DDIM": ("ddim", lambda nfe: nfe),
    "EDM Heun": ("edm_heun", lambda nfe: (nfe + 1) // 2),
    "DEIS tAB3": ("deis_tab3", lambda nfe: nfe),
    "iPNDM": ("ipndm", lambda nfe: nfe),
    "DPM-Solver++ 2M": ("dpmpp_2m", lambda nfe: nfe),
    "UniPC": ("unipc", lambda nfe: nfe),
}
# (method, baseline): the paper's claim, the method's distance is lower at the same NFE
CLAIMS = [("EDM Heun", "DDIM"), ("DEIS tAB3", "DDIM"), ("iPNDM", "DDIM"),
          ("DPM-Solver++ 2M", "DDIM"), ("UniPC", "DPM-Solver++ 2M")]
FULL = dict(nfes=(5, 10, 15, 20), num=2000, batch=250)
SMALL = dict(nfes=(5,), num=128, batch=64)


def nfe_cells(run, nfe, p, store):
    """{sampler: result dict} at one NFE of `run` = (config, denoiser, params); each method's
    result also holds its difference to its claim's baseline and the verdict."""
    config, denoiser, params = run
    dm, net, s = dataset_metric(config.data.name), denoiser.net, config.sample
    names, fns = list(SAMPLERS), []
    for name in names:
        sampler, steps_of = SAMPLERS[name]
        fn, used = get_sample_fn(denoiser, sampler=sampler, steps=steps_of(nfe),
                                 sigma_min=s.sigma_min, sigma_max=s.sigma_max)
        assert used <= nfe, (name, nfe, used)
        fns.append(((fn, params), used))
    sample_fn = paired_sample_fn([f for f, _ in fns], net.label_dim)
    tag = f"{config.data.name} {fingerprint(params)} samplers {nfe} {names}"
    scored = {}
    for baseline in sorted({names.index(b) for _, b in CLAIMS}):
        scored[baseline] = dm.evaluate(
            sample_fn, key=jax.random.key(1), num_samples=p["num"], batch_size=p["batch"],
            resolution=net.img_resolution, progress=False, settings=len(names),
            baseline=baseline, store=store, store_tag=tag)
    first = next(iter(scored.values()))
    cells = {name: dict(first[i], nfe=used) for i, (name, (_, used)) in enumerate(zip(names, fns))}
    m = dm.name
    for method, base in CLAIMS:
        r = scored[names.index(base)][names.index(method)]
        diff, interval = r[f"{m}_diff"], (r[f"{m}_diff_ci_low"], r[f"{m}_diff_ci_high"])
        cells[method].update(baseline=base, diff=diff, diff_ci=interval,
                             verdict=claim_verdict(diff, interval, "lower"))
    return cells, m


def format_table(results, p, m, workdir):
    lines = [f"Model: {workdir}. {m} (lower is better) of {p['num']} class-conditional samples "
             "per cell, every sampler on the same noise and labels, with its 95% jackknife "
             "interval; class accuracy in brackets; the difference to the paper's baseline at "
             "the same NFE with its paired-jackknife interval, and the verdict on the paper's "
             "claim (lower): holds if the whole interval is below 0, holds partly if only the "
             "estimate is.", "",
             "| NFE | sampler | " + m + " | vs | difference | verdict |", "|---|---|---|---|---|---|"]
    for nfe, cells in results.items():
        for name, c in cells.items():
            shown = f"{nfe}" + ("" if c["nfe"] == nfe else f" ({c['nfe']})")
            diff = ("-" if "diff" not in c else
                    format_interval(c["diff"], *c["diff_ci"], signed=True))
            lines.append(f"| {shown} | {name} | "
                         f"{format_interval(c[m], c[f'{m}_ci_low'], c[f'{m}_ci_high'])} "
                         f"({100 * c['class_accuracy']:.1f}%) | {c.get('baseline', '-')} | "
                         f"{diff} | {c.get('verdict', '-')} |")
    return "\n".join(lines) + "\n"


def plot(results, m, out_dir):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in SAMPLERS:
        cs = [cells[name] for cells in results.values()]
        v = np.array([c[m] for c in cs])
        err = [v - [c[f"{m}_ci_low"] for c in cs], np.array([c[f"{m}_ci_high"] for c in cs]) - v]
        ax.errorbar([c["nfe"] for c in cs], v, yerr=err, marker="o", capsize=3, label=name)
    ax.set(xlabel="NFE", ylabel=f"{m} (95% interval)", yscale="log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fd_vs_nfe.png"), dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/digits",
                   help="a training run, an exported testbed folder or a shipped testbed name")
    p.add_argument("--out", default="experiments/results/sampler_comparison")
    p.add_argument("--nfes", type=int, nargs="+")
    p.add_argument("--num", type=int, help="samples per cell")
    p.add_argument("--small", action="store_true", help="NFE 5, 128 samples: checks the code")
    p.add_argument("--store", default="runs/stores/sampler_comparison",
                   help="where drawn batches are kept, so that an interrupted run resumes "
                   "(difflax.metrics.SampleStore); 'none' keeps nothing")
    args = p.parse_args()
    params = dict(SMALL if args.small else FULL)
    params.update({k: v for k, v in (("nfes", args.nfes), ("num", args.num)) if v is not None})
    store = None if args.store == "none" else args.store
    os.makedirs(args.out, exist_ok=True)
    run, results, m = load_run(args.workdir), {}, None
    for nfe in params["nfes"]:
        tic = time.time()
        results[nfe], m = nfe_cells(run, nfe, params, store)
        print(f"NFE {nfe}: " + ", ".join(f"{k} {c[m]:.3f}" for k, c in results[nfe].items())
              + f" ({time.time() - tic:.0f} s)", flush=True)
    text = format_table(results, params, m, args.workdir)
    print(text)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(workdir=args.workdir, metric=m, settings=params,
                       results={str(k): v for k, v in results.items()}), f, indent=1)
    plot(results, m, args.out)


if __name__ == "__main__":
    main()
