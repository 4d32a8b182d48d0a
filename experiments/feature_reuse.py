"""Feature reuse on any testbed's model: quality (with error bars) and speed of every plan.

Plans (`difflax.accel`) at the same sampler and steps as the full model: Faster Diffusion's
encoder propagation (the paper's key steps, uniform key steps, parallel decoding, prior noise
injection), DeepCache (deep branch below a skip, every N steps) and A-SDM feature inheritance
(block / layer / unit, alternating steps). For each, on the same noise and labels as the full
model (>= 2000 samples): the dataset's Frechet distance (fd_digits or fd_mnist,
`difflax.metrics.dataset_metric`) with its jackknife interval, the difference to the full
model with its paired-jackknife interval, class accuracy, and the verdict on the papers'
claim (the same quality as the full model, within a tolerance of --tolerance times the full
model's distance; `difflax.metrics.claim_verdict`); model calls (full / partial / free),
compute in units of one full evaluation (XLA's FLOPs per node), and wall time per batch
measured in this run against the full model. Then the same wall-time ratios on a larger UNet
(64x64, ADM-sized channels, random weights). Writes table.md, results.json and
fd_vs_speed.png; prints the table.

Two sampling settings (`--setting`), each table naming its own:

- `edm` (default): DDIM on the model's own EDM grid (rho = 7, sigma_max -> sigma_min), whose
  last steps crowd at small sigma;
- `vp_uniform`: the papers' own setting, DDIM on Stable Diffusion's discrete VP schedule
  (scaled-linear betas, 1000 training steps) with DDIMScheduler's uniform "leading"
  timesteps (981, 961, ..., 1, then 0 for 50 steps), the same EDM denoiser re-expressed in
  that schedule's time (`difflax.workdir.edm_model_on`). Faster Diffusion's key steps were
  chosen for this grid.

`--similarity` instead runs the diagnostic behind these plans (Faster Diffusion's Fig. 2
analogue, `difflax.accel.adjacent_step_similarity`): along one DDIM trajectory of the
workdir's model (`--similarity-steps`, default 50, on its EDM grid), the cosine similarity
and relative change of the encoder, middle and decoder features between adjacent steps,
averaged over the nodes of each kind. Writes similarity.png and similarity.json.

    python experiments/feature_reuse.py [--workdir runs/digits | FOLDER | mnist_edm] [--small]
        [--setting edm|vp_uniform] [--tolerance 0.05] [--speed-only]
    python experiments/feature_reuse.py --similarity [--workdir runs/mnist] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from difflax import schedules  # noqa: E402
from difflax.pipelines import SDScheduler  # noqa: E402
from difflax.accel import (adjacent_step_similarity, deepcache_plan, denoiser_run_fn,  # noqa: E402
                           encoder_propagation_plan, faster_diffusion_key_steps, full_plan,
                           inheritance_plan, node_flops, plan_cost)
from difflax.images import save_grid  # noqa: E402
from difflax.metrics import claim_verdict, dataset_metric, fingerprint, format_interval  # noqa: E402
from difflax.models import Denoiser, adm  # noqa: E402
from difflax.samplers import make_grid  # noqa: E402
from difflax.samplers.flow import euler_trajectory  # noqa: E402
from difflax.timing import interleaved_times  # noqa: E402
from difflax.workdir import get_sample_fn, load_run, paired_sample_fn  # noqa: E402

SETTINGS = {
    "edm": "DDIM on the model's EDM grid (rho = 7)",
    "vp_uniform": "DDIM on Stable Diffusion's VP schedule, uniform (leading) timesteps",
}
FULL = dict(sampler="ddim", steps=50, num=2000, batch=250, time_batch=100, big_steps=20,
            big_batch=1, repeats=3, big=dict(num_blocks=1))
SMALL = dict(sampler="ddim", steps=20, num=128, batch=64, time_batch=64, big_steps=20,
             big_batch=1, repeats=2, big=dict(model_channels=32, channel_mult=(1, 2),
                                              num_blocks=1, attn_resolutions=(16,)))


def model_plans(net, steps):
    """The plans compared on the testbed's UNet (A-SDM's targets at its lowest resolution,
    e.g. 4x4 on the 16x16 digits UNet)."""
    low = net.img_resolution >> (len(net.channel_mult) - 1)
    attn = [n for n in ("dec.%dx%d_in0" % (low, low),)]
    return [
        full_plan(steps),
        encoder_propagation_plan(net, steps),
        encoder_propagation_plan(net, steps, parallel=True),
        encoder_propagation_plan(net, steps, parallel=True, noise_injection=0.003),
        encoder_propagation_plan(net, steps, every=5, parallel=True),
        deepcache_plan(net, steps, branch=0, interval=3),
        deepcache_plan(net, steps, branch=0, interval=5),
        inheritance_plan(net, steps, granularity="block", targets=[f"dec.{low}x{low}"]),
        inheritance_plan(net, steps, granularity="layer",
                         targets=[f"dec.{low}x{low}_in0", f"dec.{low}x{low}_in1"]),
        inheritance_plan(net, steps, granularity="unit", targets=attn),
    ]


def label(plan):
    extra = " + noise injection" if plan.injection else ""
    keys = sum(plan.refresh)
    return f"{plan.name}{extra}" + ("" if plan.name == "full" else f" ({keys} refresh steps)")


def min_times(fns, args, repeats):
    """{name: (wall s, process CPU s)} of fn(*args), each the minimum over `repeats`
    interleaved rounds (`difflax.timing`): a burst of load from other processes hits all plans
    alike and is discarded."""
    timings = interleaved_times({k: functools.partial(fn, *args) for k, fn in fns.items()},
                                repeats)
    return {k: (float(t.wall.min()), float(t.cpu.min())) for k, t in timings.items()}


def sampling_setting(setting, config, steps):
    """get_sample_fn's schedule arguments of a --setting."""
    s = config.sample
    if setting == "edm":
        return dict(sigma_min=s.sigma_min, sigma_max=s.sigma_max, steps=steps)
    sd = SDScheduler()
    return dict(sigma_min=s.sigma_min, sigma_max=s.sigma_max, schedule=sd.schedule(),
                grid=sd.ddim_grid(steps))


def model_part(workdir, p, out_dir, setting, tolerance, previous=None, store=None):
    """Rows per plan; with `previous` (rows of an earlier run) only the timing is redone and
    the quality columns are taken from it. `store`: where the drawn batches are kept
    (`difflax.metrics.SampleStore`), so that an interrupted run resumes."""
    config, denoiser, params = load_run(workdir)
    net, dm = denoiser.net, dataset_metric(config.data.name)
    x = jnp.zeros((p["time_batch"], net.img_resolution, net.img_resolution, net.in_channels))
    t = jnp.full((p["time_batch"],), 1.0)
    labels = jnp.arange(p["time_batch"]) % max(net.label_dim, 1)
    flops = node_flops(net, denoiser_run_fn(denoiser, {"params": params}, labels), x, t)
    plans = model_plans(net, p["steps"])
    fns = {label(plan): get_sample_fn(denoiser, sampler=p["sampler"], plan=plan,
                                      **sampling_setting(setting, config, p["steps"]))
           for plan in plans}
    times = min_times({k: fn for k, (fn, _) in fns.items()}, (params, jax.random.key(7), labels),
                     p["repeats"])
    if previous:  # --speed-only: the quality columns of the earlier run
        quality = [previous[label(plan)]["quality"] for plan in plans]
    else:
        quality = dm.evaluate(paired_sample_fn([(fns[label(plan)][0], params) for plan in plans],
                                               net.label_dim),
                              key=jax.random.key(1), num_samples=p["num"], batch_size=p["batch"],
                              resolution=net.img_resolution, progress=False,
                              settings=len(plans), baseline=0, store=store,
                              store_tag=f"{config.data.name} {fingerprint(params)} {setting} "
                                        f"{p['sampler']} {p['steps']} {[label(q) for q in plans]}")
    rows = []
    for plan, q in zip(plans, quality):
        (fn, nfe), (seconds, cpu) = fns[label(plan)], times[label(plan)]
        cost = plan_cost(net, plan, 1)
        rows.append(dict(plan=label(plan), nfe=nfe, full=cost.full, partial=cost.partial,
                         free=cost.free, equivalent_nfe=cost.equivalent_nfe(flops),
                         seconds=seconds, cpu_seconds=cpu, quality=q))
        if not previous:
            grid = fn(params, jax.random.key(3), jnp.arange(100) % max(net.label_dim, 1))
            save_grid(os.path.join(out_dir, f"grid_{len(rows):02d}.png"), np.asarray(grid),
                      nrow=10)
        print(f"{rows[-1]['plan']}: {dm.name} {q[dm.name]:.3f}, {seconds:.2f} s/batch", flush=True)
    base = rows[0]
    for r in rows:
        r["speedup"] = base["seconds"] / r["seconds"]
        r["cpu_speedup"] = base["cpu_seconds"] / r["cpu_seconds"]
        q, limit = r["quality"], tolerance * base["quality"][dm.name]
        diff = (q[f"{dm.name}_diff"], (q[f"{dm.name}_diff_ci_low"], q[f"{dm.name}_diff_ci_high"]))
        r["verdict"] = "-" if r is base else claim_verdict(*diff, "no_worse", tolerance=limit)
    return rows, dm.name


def big_part(p):
    """Wall-time ratios on a 64x64 ADM-sized UNet with random weights (DPM-Solver++ 2M)."""
    arch = dict(img_resolution=64, in_channels=3, out_channels=3, label_dim=0, dropout=0.0,
                **p["big"])
    net = adm(**arch)
    denoiser = Denoiser(net=net)
    x = jnp.zeros((p["big_batch"], 64, 64, 3))
    shapes = jax.eval_shape(denoiser.init, jax.random.key(0), x, jnp.ones(p["big_batch"]))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.02, a.dtype),
                          shapes)["params"]
    steps = p["big_steps"]
    plans = [full_plan(steps), encoder_propagation_plan(net, steps),
             encoder_propagation_plan(net, steps, parallel=True),
             deepcache_plan(net, steps, branch=0, interval=3)]
    fns = {label(plan): get_sample_fn(denoiser, sampler="dpmpp_2m", steps=steps,
                                      sigma_min=0.002, sigma_max=80.0, plan=plan)[0]
           for plan in plans}
    times = min_times(fns, (params, jax.random.key(0), jnp.zeros(p["big_batch"], int)), p["repeats"])
    full = times[label(plans[0])]
    rows = [dict(plan=name, seconds=w, cpu_seconds=c, speedup=full[0] / w, cpu_speedup=full[1] / c)
            for name, (w, c) in times.items()]
    print("\n".join(f"64x64 ADM {r['plan']}: {r['seconds']:.2f} s" for r in rows), flush=True)
    params_count = sum(a.size for a in jax.tree.leaves(params))
    return rows, dict(arch, params=int(params_count), batch=p["big_batch"], steps=steps)


def format_table(rows, big_rows, big_info, p, name, setting, tolerance, workdir):
    lines = [f"Model: {workdir}. Setting {setting!r}: {SETTINGS[setting]}, {p['steps']} steps. "
             f"{name} of {p['num']} samples (the same noise and labels for every plan) with its "
             "95% jackknife interval; the change is the plan's minus the full model's, with its "
             "paired-jackknife interval. Verdict on the papers' claim (the same quality): holds "
             f"if the whole interval of the change is at most {tolerance:.0%} of the full "
             "model's distance, holds partly if the interval straddles that, does not hold here "
             f"if it lies above. Wall time per batch of {p['time_batch']} (best of "
             f"{p['repeats']} round-robin rounds; CPU time in brackets).", "",
             f"| plan | full / partial / free calls | compute (full evals) | {name} | change "
             "| verdict | class acc. | s / batch | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r["quality"]
        fd = format_interval(q[name], q[f"{name}_ci_low"], q[f"{name}_ci_high"])
        change = format_interval(q[f"{name}_diff"], q[f"{name}_diff_ci_low"],
                                 q[f"{name}_diff_ci_high"], signed=True)
        lines.append(f"| {r['plan']} | {r['full']} / {r['partial']} / {r['free']} | "
                     f"{r['equivalent_nfe']:.1f} | {fd} | {change} | {r['verdict']} | "
                     f"{q['class_accuracy']:.3f} | {r['seconds']:.2f} | {r['speedup']:.2f}x "
                     f"({r['cpu_speedup']:.2f}x) |")
    lines += ["", f"64x64 ADM-sized UNet ({big_info['params'] / 1e6:.1f} M parameters, random "
              f"weights), DPM-Solver++(2M) {big_info['steps']} steps on the EDM grid, batch "
              f"{big_info['batch']}:", "",
              "| plan | s / run | speed-up (CPU time) |", "|---|---|---|"]
    lines += [f"| {r['plan']} | {r['seconds']:.2f} | {r['speedup']:.2f}x ({r['cpu_speedup']:.2f}x) |"
              for r in big_rows]
    return "\n".join(lines) + "\n"


def plot(rows, path, name, setting):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        q = r["quality"]
        ax.errorbar(r["speedup"], q[name], yerr=[[q[name] - q[f"{name}_ci_low"]],
                                                 [q[f"{name}_ci_high"] - q[name]]],
                    fmt="o", capsize=3)
        ax.annotate(r["plan"].split(" (")[0], (r["speedup"], q[name]), fontsize=7)
    ax.set_xlabel("speed-up over the full model (wall time)")
    ax.set_ylabel(f"{name} (lower is better)")
    ax.set_title(f"Feature reuse ({SETTINGS[setting]})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def similarity_part(workdir, out_dir, steps, batch=16):
    """Adjacent-step feature similarity along one DDIM trajectory (Euler on the EDM grid);
    writes similarity.json and similarity.png, returns the per-kind means."""
    config, denoiser, params = load_run(workdir)
    net, s = denoiser.net, config.sample
    schedule = schedules.edm(s.sigma_min, s.sigma_max)
    grid = make_grid(schedule, "ddim", steps)
    labels = jnp.arange(batch) % max(net.label_dim, 1)
    run = denoiser_run_fn(denoiser, {"params": params}, labels)
    noise = jax.random.normal(jax.random.key(5), (batch, net.img_resolution, net.img_resolution,
                                                  net.in_channels))
    traj = jax.jit(lambda n: euler_trajectory(lambda x, t: run(x, t)[0], n, schedule=schedule,
                                              grid=grid, prediction="x0"))(noise)
    sim = adjacent_step_similarity(run, net, traj[:-1], grid[:-1])
    kinds = ("encoder", "middle", "decoder")
    result = dict(workdir=workdir, sampler="ddim", steps=steps, batch=batch,
                  sigma=[float(g) for g in grid[1:-1]],
                  **{f"{k}_{q}": sim.mean(k, q).tolist() for k in kinds
                     for q in ("cosine", "relative_change")},
                  nodes=dict(names=sim.names, cosine=sim.cosine.tolist(),
                             relative_change=sim.relative_change.tolist()))
    with open(os.path.join(out_dir, "similarity.json"), "w") as f:
        json.dump(result, f, indent=1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(1, steps)
    for ax, q in zip(axes, ("cosine", "relative_change")):
        for k in kinds:
            ax.plot(x, result[f"{k}_{q}"], label=k)
        for key_step in faster_diffusion_key_steps(steps)[1:]:
            ax.axvline(key_step, color="0.85", lw=0.8, zorder=0)
        ax.set_xlabel("step i (grey: Faster Diffusion key steps)")
        ax.set_ylabel("cosine(f_i, f_(i-1))" if q == "cosine" else "|f_i - f_(i-1)| / |f_(i-1)|")
        ax.legend()
    fig.suptitle(f"Features between adjacent DDIM steps ({steps} steps, {workdir})")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "similarity.png"), dpi=120)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/digits",
                    help="a training run, an exported testbed folder or a shipped testbed name")
    ap.add_argument("--out", default="experiments/results/feature_reuse")
    ap.add_argument("--small", action="store_true", help="a quick run with few samples")
    ap.add_argument("--setting", choices=tuple(SETTINGS), default="edm",
                    help="the sampling setting: " + "; ".join(f"{k}: {v}"
                                                              for k, v in SETTINGS.items()))
    ap.add_argument("--tolerance", type=float, default=0.05,
                    help="the largest loss of quality the verdict accepts, as a fraction of "
                         "the full model's distance")
    ap.add_argument("--speed-only", action="store_true",
                    help="redo only the timings (e.g. on a quiet machine), keeping the quality "
                         "columns of OUT/results.json")
    ap.add_argument("--similarity", action="store_true",
                    help="only the adjacent-step feature similarity diagnostic of --workdir's "
                         "model: OUT/similarity.png and similarity.json")
    ap.add_argument("--similarity-steps", type=int, default=50)
    ap.add_argument("--store", default="runs/stores/feature_reuse",
                    help="where drawn batches are kept, so that an interrupted run resumes "
                         "(difflax.metrics.SampleStore); 'none' keeps nothing")
    args = ap.parse_args()
    if args.tolerance < 0:
        ap.error(f"--tolerance {args.tolerance}: must be >= 0")
    p = SMALL if args.small else FULL
    os.makedirs(args.out, exist_ok=True)
    if args.similarity:
        r = similarity_part(args.workdir, args.out, args.similarity_steps)
        for k in ("encoder", "middle", "decoder"):
            print(f"{k}: cosine {np.min(r[k + '_cosine']):.4f}..{np.max(r[k + '_cosine']):.4f}, "
                  f"relative change {np.min(r[k + '_relative_change']):.4f}.."
                  f"{np.max(r[k + '_relative_change']):.4f}")
        return
    previous = None
    if args.speed_only:
        with open(os.path.join(args.out, "results.json")) as f:
            previous = {r["plan"]: r for r in json.load(f)["model"]}
    t0 = time.time()
    rows, name = model_part(args.workdir, p, args.out, args.setting, args.tolerance, previous,
                            None if args.store == "none" else args.store)
    big_rows, big_info = big_part(p)
    table = format_table(rows, big_rows, big_info, p, name, args.setting, args.tolerance,
                         args.workdir)
    print(table)
    print(f"total {time.time() - t0:.0f} s")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(settings=dict(p), workdir=args.workdir, setting=args.setting,
                       tolerance=args.tolerance, metric=name, model=rows, big=big_rows,
                       big_model=big_info), f, indent=1, default=str)
    plot(rows, os.path.join(args.out, "fd_vs_speed.png"), name, args.setting)


if __name__ == "__main__":
    main()
