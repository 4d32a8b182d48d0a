"""Sampler overhead: how close a jitted difflax sampling run gets to NFE x one network call.

For a small random-weight DDPM++ UNet behind EDM preconditioning (x0-prediction, time = sigma)
on the EDM schedule, measures
  - T_net: median wall time of one jitted D(x; sigma) on the batch (after warm-up);
  - per sampler: compile time of `jax.jit(fn).lower(...).compile()` for a whole sampling
    run (the pure function of `difflax.samplers.get_sample_fn`), its median wall time, and
    overhead = wall / (NFE x T_net) (goal <= 1.05);
  - for Euler (= DDIM here) and EDM Heun, the same sampler as a plain Python loop calling the
    jitted network each step, its wall time, overhead, and the ratio difflax / loop.
Writes OUT/table.md (also printed), OUT/sampler_overhead.json (raw numbers) and
OUT/sampler_overhead.png (overhead ratio per sampler).

    python experiments/sampler_overhead.py [--out experiments/results/sampler_overhead]
        [--batch 64] [--steps 10] [--samplers ddim edm_heun ...] [--reps 5] [--small]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from difflax import schedules as S
from difflax.models import Denoiser, ddpmpp
from difflax.samplers import get_sample_fn, make_grid

# label -> (sampler name, options); orders are lowered when the grid is too short for them
SAMPLERS = {
    "ddim": ("ddim", {}), "deis_tab3": ("deis_tab", dict(order=3)),
    "deis_rhoab3": ("deis_rhoab", dict(order=3)), "deis_rhork4": ("deis_rhork", dict(method="rk4")),
    "ipndm4": ("ipndm", dict(order=4)), "dpmpp_2m": ("dpmpp_2m", {}), "dpmpp_3m": ("dpmpp_3m", {}),
    "edm_heun": ("edm_heun", {}), "euler_maruyama": ("euler_maruyama", {}),
}


def timed(fn, reps):
    """Median wall seconds of `reps` calls of fn() (blocked), after one warm-up call."""
    jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


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
    t_net, t_net_all = timed(lambda: net(params, noise, sigma), max(reps, 10))
    sched, key = S.edm(), jax.random.key(2)
    rows = []
    for label in tqdm(labels, desc="samplers"):
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
        compile_s = time.perf_counter() - t0
        wall, wall_all = timed(lambda: compiled(params, noise, key), reps)
        row = dict(label=label, sampler=name, options=opts, nfe=nfe["n"], compile_s=compile_s,
                   wall_s=wall, wall_all_s=wall_all, ideal_s=nfe["n"] * t_net,
                   ratio=wall / (nfe["n"] * t_net))
        if name in LOOPS:
            grid = [float(g) for g in make_grid(sched, name, steps)]
            loop = LOOPS[name]
            lw, lw_all = timed(lambda: loop(net, params, noise, grid), reps)
            diff = float(jnp.max(jnp.abs(loop(net, params, noise, grid)
                                         - compiled(params, noise, key))))
            row.update(loop_wall_s=lw, loop_wall_all_s=lw_all, loop_ratio=lw / (nfe["n"] * t_net),
                       difflax_over_loop=wall / lw, loop_max_abs_diff=diff)
        rows.append(row)
    env = dict(jax=jax.__version__, device=str(jax.devices()[0]), backend=jax.default_backend(),
               cpu_count=os.cpu_count(), batch=batch, steps=steps, reps=reps, t_net_s=t_net,
               t_net_all_s=t_net_all)
    write(out_dir, env, rows)


def write(out_dir, env, rows):
    f = lambda r, k, fmt: format(r[k], fmt) if k in r else "-"  # noqa: E731
    lines = [f"Sampler overhead: jax {env['jax']}, device {env['device']} ({env['backend']}), "
             f"{env['cpu_count']} CPUs; DDPM++ 16x16 UNet, batch {env['batch']}, "
             f"{env['steps']} steps, EDM schedule, median of {env['reps']} runs", "",
             "| sampler | NFE | compile s | wall ms | NFE x T_net ms | overhead ratio "
             "| loop wall ms | difflax/loop |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = {k: r[k] * 1e3 for k in ("wall_s", "ideal_s", "loop_wall_s") if k in r}
        lines.append(f"| {r['label']} | {r['nfe']} | {r['compile_s']:.2f} | {ms['wall_s']:.1f} "
                     f"| {ms['ideal_s']:.1f} | {r['ratio']:.3f} | "
                     + (f"{ms['loop_wall_s']:.1f} (ratio {r['loop_ratio']:.3f})"
                        if "loop_wall_s" in ms else "-")
                     + f" | {f(r, 'difflax_over_loop', '.3f')} |")
    lines += ["", f"T_net (one jitted D(x; sigma) on batch {env['batch']}): "
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
    ax.bar(xs - 0.2, [r["ratio"] for r in rows], 0.4, label="difflax (jitted)")
    loops = [(i, r["loop_ratio"]) for i, r in enumerate(rows) if "loop_ratio" in r]
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
    p.add_argument("--reps", type=int, default=5, help="timed runs per measurement")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--small", action="store_true", help="batch 4, 3 steps, 3 reps: a quick check")
    a = p.parse_args()
    if a.small:
        a.batch, a.steps, a.reps = 4, 3, 3
    run(a.out, a.batch, a.steps, a.samplers, a.reps)


if __name__ == "__main__":
    main()
