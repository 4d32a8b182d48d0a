"""Faster Diffusion's encoder propagation on SiT (its DiT setting, Li et al. 2024 Sec. 4) on
VAE latents of the digits: speed-up and fd_digits against plain sampling.

    PYTHONPATH=. python experiments/digits_vae.py --out runs/digits_vae      # 8x8 -> 4x4x4
    difflax encode --vae runs/digits_vae --data digits --resolution 8 --out runs/digits_vae_latents
    difflax train --config configs/digits_latent_sit.py --workdir runs/digits_vae_sit \
        --config.data.latents_dir=runs/digits_vae_latents --config.model.patch_size=1 \
        --config.model.depth=8                                          # 16 tokens, 8 blocks
    PYTHONPATH=. python experiments/sit_feature_reuse.py --workdir runs/digits_vae_sit \
        [--out experiments/results/sit_feature_reuse] [--small]

Plans: `encoder_propagation_plan` over `SiTConfig.feature_graph(encoder_depth=N)`, the same
mechanism as the UNets' (`difflax.interpolants.sit_run_fn` runs SiT with the feature cache).
Faster Diffusion takes DiT-XL/2's first 18 of 28 blocks as the encoder and reuses their output
at the non-key steps; here N = round(18 / 28 depth) and depth / 2 blocks, with the key steps of
its code for 20 / 50 steps (0 1 2 3 5 10 15 [25 35]), sequential and (for the first N) with
parallel decoding of the non-key steps. Sampler: DDIM on the linear interpolant (Euler on SiT's
probability-flow ODE, SiT's uniform grid in t), velocity prediction, class labels, no guidance;
every plan gets the same noise and labels. Quality: fd_digits of the VAE-decoded samples with
its jackknife interval, the paired difference to plain sampling with its interval, class
accuracy, and the verdict on the claim "the same quality" (within --tolerance times plain
sampling's fd_digits; `difflax.metrics.claim_verdict`). Speed: the sampler's wall time on one
batch of latents (the decoder, the same for every plan, excluded) in interleaved rounds
(`difflax.timing`); the speed-up is the median per-round ratio to plain sampling, with its
interquartile range; model calls from `plan_cost`. Writes OUT/table.md and OUT/results.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import numpy as np

from difflax.accel import encoder_propagation_plan, full_plan, plan_cost
from difflax.interpolants import interpolant_schedule, sit_run_fn
from difflax.latent_runs import get_decode_fn
from difflax.latents import latents_info
from difflax.metrics import claim_verdict, dataset_metric, format_interval
from difflax.samplers import get_sample_fn
from difflax.timing import interleaved_times, ratio_summary
from difflax.workdir import load_run, paired_sample_fn

FULL = dict(steps=20, num=1000, batch=200, time_batch=100, rounds=3)
SMALL = dict(steps=20, num=64, batch=32, time_batch=32, rounds=2)


def plans(config, steps):
    """(label, plan, graph) of plain sampling and encoder propagation with round(18 / 28 depth)
    and depth / 2 encoder blocks (sequential; the first also with parallel decoding)."""
    depth = config.depth
    depths = sorted({max(1, round(18 / 28 * depth)), max(1, depth // 2)}, reverse=True)
    rows = [("plain", full_plan(steps), config.feature_graph())]
    for n in depths:
        graph = config.feature_graph(encoder_depth=n)
        rows.append((f"encoder propagation, {n} of {depth} blocks",
                     encoder_propagation_plan(graph, steps), graph))
    graph = config.feature_graph(encoder_depth=depths[0])
    rows.append((f"encoder propagation, {depths[0]} of {depth} blocks, parallel decoding",
                 encoder_propagation_plan(graph, steps, parallel=True), graph))
    return rows


def latent_sampler(model, plan, graph, steps):
    """Jitted fn(params, noise (B, h, h, C), labels (B,)) -> latents: DDIM on the linear
    interpolant on SiT's uniform grid, with `plan`'s feature cache (plain: no cache)."""
    plain = plan.name == "full"
    y = lambda labels: labels if model.config.num_classes else None

    def builder(params, labels, skip_scales):
        run = sit_run_fn(model, {"params": params}, y(labels))
        return (lambda x, s: run(x, s)[0]) if plain else run

    fn, nfe = get_sample_fn(builder, schedule=interpolant_schedule("linear"), sampler="ddim",
                            grid=np.linspace(1.0, 0.0, steps + 1), prediction="velocity",
                            plan=None if plain else plan, graph=graph)
    return jax.jit(lambda params, noise, labels: fn(params, noise, labels)), nfe


def measure(workdir, p, tolerance, vae=None):
    config, model, params = load_run(workdir)
    c, dm = model.config, dataset_metric("digits")
    decode = get_decode_fn(config.data.latents_dir, vae)
    shape = (c.input_size, c.input_size, c.in_channels)
    cases = plans(c, p["steps"])
    samplers = {name: latent_sampler(model, plan, graph, p["steps"]) for name, plan, graph in cases}

    def images(fn):  # labelled_sample_fn's sample(params, key, labels): decoded, same noise
        return lambda params, key, labels: decode(fn(params, jax.random.normal(
            key, (labels.shape[0], *shape)), labels))

    quality = dm.evaluate(
        paired_sample_fn([(images(fn), params) for fn, _ in samplers.values()], c.num_classes),
        key=jax.random.key(1), num_samples=p["num"], batch_size=p["batch"],
        resolution=latents_info(config.data.latents_dir)["resolution"], progress=False,
        settings=len(cases), baseline=0)
    noise = jax.random.normal(jax.random.key(7), (p["time_batch"], *shape))
    labels = np.arange(p["time_batch"]) % max(c.num_classes, 1)
    times = interleaved_times({name: functools.partial(fn, params, noise, labels)
                               for name, (fn, _) in samplers.items()}, p["rounds"])
    base, rows = times["plain"].wall, []
    for (name, plan, graph), q in zip(cases, quality):
        cost = plan_cost(graph, plan, 1)
        diff = (q["fd_digits_diff"], (q["fd_digits_diff_ci_low"], q["fd_digits_diff_ci_high"]))
        rows.append(dict(plan=name, nfe=samplers[name][1], full=cost.full, partial=cost.partial,
                         seconds=float(np.median(times[name].wall)),
                         speedup=ratio_summary(base / times[name].wall), quality=q,
                         verdict="-" if name == "plain" else claim_verdict(
                             *diff, "no_worse", tolerance=tolerance * quality[0]["fd_digits"])))
        print(f"{name}: fd_digits {q['fd_digits']:.3f}, {rows[-1]['seconds']:.3f} s", flush=True)
    return rows, dict(workdir=workdir, depth=c.depth, hidden_size=c.hidden_size,
                      tokens=c.num_patches, latent_shape=list(shape), **p)


def format_table(rows, info, tolerance):
    lines = [f"SiT {info['workdir']} (depth {info['depth']}, hidden {info['hidden_size']}, "
             f"{info['tokens']} tokens of {info['latent_shape']} latents); DDIM (Euler on the "
             f"linear interpolant), {info['steps']} steps, no guidance; {info['num']} samples "
             f"per plan on the same noise and labels, decoded; time: batch of "
             f"{info['time_batch']} latents, {info['rounds']} interleaved rounds.", "",
             "| plan | SiT calls full / partial | fd_digits [95%] | difference to plain [95%] "
             "| class accuracy | s / batch | speed-up [IQR] | same quality (tolerance "
             f"{tolerance:g} x plain) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q, (m, lo, hi) = r["quality"], r["speedup"]
        diff = ("-" if r["plan"] == "plain" else format_interval(
            q["fd_digits_diff"], q["fd_digits_diff_ci_low"], q["fd_digits_diff_ci_high"],
            signed=True))
        lines.append(f"| {r['plan']} | {r['full']} / {r['partial']} | "
                     f"{format_interval(q['fd_digits'], q['fd_digits_ci_low'], q['fd_digits_ci_high'])}"
                     f" | {diff} | {q['class_accuracy']:.3f} | {r['seconds']:.3f} | "
                     f"{m:.2f}x [{lo:.2f}, {hi:.2f}] | {r['verdict']} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a SiT run of `difflax train` on latents")
    p.add_argument("--vae", help="the VAE folder (default: the one latents.json records)")
    p.add_argument("--out", default="experiments/results/sit_feature_reuse")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--small", action="store_true", help="64 samples, 2 rounds: a check")
    p.add_argument("--num", type=int, help=f"samples per plan (default {FULL['num']})")
    args = p.parse_args()
    setting = dict(SMALL if args.small else FULL)
    setting["num"] = args.num or setting["num"]
    rows, info = measure(args.workdir, setting, args.tolerance, args.vae)
    table = format_table(rows, info, args.tolerance)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(info=info, rows=rows), f, indent=2, default=float)
    print(table)


if __name__ == "__main__":
    main()
