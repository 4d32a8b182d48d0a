"""Sampler overhead: how close a jitted difflax sampling run gets to NFE x one network call.

For a small random-weight DDPM++ UNet behind EDM preconditioning (x0-prediction, time = sigma)
on the EDM schedule, measures
  - T_net: wall time of one jitted D(x; sigma) on the batch (after warm-up);
  - per sampler: compile time of `jax.jit(fn).lower(...).compile()` for a whole sampling
    run (the pure function of `difflax.samplers.get_sample_fn`), its wall time, and
    overhead = wall / (NFE x T_net) (goal <= 1.05);
  - for Euler (= DDIM here) and EDM Heun, the same sampler as a plain Python loop calling the
    jitted network each step, its wall time, overhead, and the ratio difflax / loop.
The network, every sampler and every loop run once per round, in turn (`difflax.timing`),
and each ratio is the median [interquartile range] over rounds of that round's ratio.
Writes OUT/table.md (also printed), OUT/sampler_overhead.json (raw numbers) and
OUT/sampler_overhead.png (overhead ratio per sampler).

    python experiments/sampler_overhead.py [--out experiments/results/sampler_overhead]
        [--batch 64] [--steps 10] [--samplers ddim edm_heun ...] [--reps 5] [--small]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from difflax import schedules as S
from difflax.models import Denoiser, ddpmpp
from difflax.samplers import get_sample_fn, make_grid
from difflax.timing import interleaved_times, ratio_summary

# label -> (sampler name, options); orders are lowered when the grid is too short for them
SAMPLERS = {
    "ddim": ("ddim", {}), "deis_tab3": ("deis_tab", dict(order=3)),
    "deis_rhoab3": ("deis_rhoab", dict(order=3)), "deis_rhork4": ("deis_rhork", dict(method="rk4")),
    "ipndm4": ("ipndm", dict(order=4)), "dpmpp_2m": ("dpmpp_2m", {}), "dpmpp_3m": ("dpmpp_3m", {}),
    "edm_heun": ("edm_heun", {}), "euler_maruyama": ("euler_maruyama", {}),
}


def euler_loop(net, params, noise, grid):
    """Euler on dx/dsigma = (x - D(x; sigma)) / sigma, one jitted D per step."""
    x = grid[0] * noise
    for t0, t1 in zip(grid[:-1], grid[1:]):
        d = (x - net(params, x, jnp.full(x.shape[:1], t0, x.dtype))) / t0
        x = x + (t1 - t0) * d
    return x


def heun_loop(net, params, noise, grid):
    """EDM Heun (Karras et al. 2022 Alg. 1); no correction on the final step to sigma = 0."""
    x = grid[0] * noise
    for t0, t1 in zip(grid[:-1], grid[1:]):
        d = (x - net(params, x, jnp.full(x.shape[:1], t0, x.dtype))) / t0
        x1 = x + (t1 - t0) * d
        if t1 > 0:
            d1 = (x1 - net(params, x1, jnp.full(x.shape[:1], t1, x.dtype))) / t1
            x1 = x + (t1 - t0) * (d + d1) / 2
        x = x1
    return x


LOOPS = {"ddim": euler_loop, "edm_heun": heun_loop}


def random_params(den, x, sigma, seed=0):
    """Normal(0, 0.05) parameters of the right shapes, without compiling `init`."""
    shapes = jax.eval_shape(den.init, jax.random.key(0), x, sigma)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.05, s.dtype), shapes)


def run(out_dir, batch, steps, labels, reps):
    os.makedirs(out_dir, exist_ok=True)
    den = Denoiser(net=ddpmpp(img_resolution=16, in_channels=1, out_channels=1, label_dim=0,
                              model_channels=16, channel_mult=(1, 2, 2), num_blocks=2,
                              attn_resolutions=(8,), dropout=0.0))
    noise = jax.random.normal(jax.random.key(1), (batch, 16, 16, 1))
    sigma = jnp.ones((batch,))
    params = random_params(den, noise, sigma)
    net = jax.jit(den.apply)
    sched, key = S.edm(), jax.random.key(2)
    fns, rows = {"net": lambda: net(params, noise, sigma)}, []
    for label in tqdm(labels, desc="compiling"):
        name, opts = SAMPLERS[label]
        if "order" in opts:  # as sampler_accuracy.py: lower the order on short grids
            order = min(opts["order"], steps if name == "ipndm" else steps - 1)
            label += f" (order {order})" if order < opts["order"] else ""
            opts = dict(opts, order=order)
        nfe = {}

        def fn(params, noise, key, name=name, opts=opts, nfe=nfe):
            sample_fn, nfe["n"] = get_sample_fn(
                lambda p, labels, skip_scales: lambda x, t: den.apply(p, x, t), schedule=sched,
                sampler=name, steps=steps, prediction="x0", key=key, **opts)
            return sample_fn(params, noise)

        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(params, noise, key).compile()
        rows.append(dict(label=label, sampler=name, options=opts, nfe=nfe["n"],
                         compile_s=time.perf_counter() - t0))
        fns[label] = functools.partial(compiled, params, noise, key)
        if name in LOOPS:
            grid = [float(g) for g in make_grid(sched, name, steps)]
            fns[label + " loop"] = functools.partial(LOOPS[name], net, params, noise, grid)
    timings = interleaved_times(fns, reps)
    t_net = timings["net"].wall
    for row in rows:
        t, n = timings[row["label"]], row["nfe"]
        row.update(wall_s=float(np.median(t.wall)), ideal_s=float(n * np.median(t_net)),
                   ratio=ratio_summary(t.wall / (n * t_net)))
        if row["label"] + " loop" in timings:
            loop = timings[row["label"] + " loop"]
            row.update(loop_wall_s=float(np.median(loop.wall)),
                       loop_ratio=ratio_summary(loop.wall / (n * t_net)),
                       difflax_over_loop=ratio_summary(t.wall / loop.wall),
                       loop_max_abs_diff=float(jnp.max(jnp.abs(loop.output - t.output))))
    env = dict(jax=jax.__version__, device=str(jax.devices()[0]), backend=jax.default_backend(),
               cpu_count=os.cpu_count(), batch=batch, steps=steps, reps=reps,
               t_net_s=float(np.median(t_net)))
    write(out_dir, env, rows)


def write(out_dir, env, rows):
    def iqr(r, k):
        if k not in r:
            return "-"
        m, lo, hi = r[k]
        return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = [f"Sampler overhead: jax {env['jax']}, device {env['device']} ({env['backend']}), "
             f"{env['cpu_count']} CPUs; DDPM++ 16x16 UNet, batch {env['batch']}, "
             f"{env['steps']} steps, EDM schedule; {env['reps']} interleaved rounds; ratios: "
             "median [interquartile range] of per-round ratios", "",
             "| sampler | NFE | compile s | wall ms | NFE x T_net ms | overhead ratio "
             "| loop wall ms | loop overhead ratio | difflax/loop |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loop = f"{r['loop_wall_s'] * 1e3:.1f}" if "loop_wall_s" in r else "-"
        lines.append(f"| {r['label']} | {r['nfe']} | {r['compile_s']:.2f} | "
                     f"{r['wall_s'] * 1e3:.1f} | {r['ideal_s'] * 1e3:.1f} | {iqr(r, 'ratio')} | "
                     f"{loop} | {iqr(r, 'loop_ratio')} | {iqr(r, 'difflax_over_loop')} |")
    lines += ["", f"T_net (one jitted D(x; sigma) on batch {env['batch']}, median): "
              f"{env['t_net_s'] * 1e3:.2f} ms; goal: overhead ratio <= 1.05"]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(out_dir, "table.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(out_dir, "sampler_overhead.json"), "w") as fh:
        json.dump(dict(env=env, rows=rows), fh, indent=1)
    plot(out_dir, rows)


def plot(out_dir, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["ratio"][0] for r in rows], 0.4, label="difflax (jitted)")
    loops = [(i, r["loop_ratio"][0]) for i, r in enumerate(rows) if "loop_ratio" in r]
    if loops:
        ax.bar([i + 0.2 for i, _ in loops], [v for _, v in loops], 0.4, label="Python loop")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.05, color="r", ls="--", lw=0.8, label="goal 1.05")
    ax.set_xticks(xs, [r["label"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("wall / (NFE x T_net)")
    ax.set_title("Sampler overhead over NFE network calls")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "sampler_overhead.png"), dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="experiments/results/sampler_overhead")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--small", action="store_true", help="batch 4, 3 steps, 3 reps: a quick check")
    a = p.parse_args()
    if a.small:
        a.batch, a.steps, a.reps = 4, 3, 3
    run(a.out, a.batch, a.steps, a.samplers, a.reps)


if __name__ == "__main__":
    main()
