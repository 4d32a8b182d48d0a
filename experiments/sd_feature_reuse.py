"""Feature-reuse plans on Stable Diffusion 1.5's UNet architecture: model calls, compute and
wall time against plain sampling, in one run (README, "Stable Diffusion").

The UNet is SD 1.5's (`SDUNetConfig()`, 860M parameters) with random weights (no checkpoint
can be downloaded here; the costs do not depend on the weights), at 256x256 images (32x32x4
latents), DDIM with classifier-free guidance (both branches in one UNet call, `sd_run_fn`) on
SD's discrete schedule and DDIMScheduler's timesteps, random (B, 77, 768) text embeddings.
Plans, each in the paper's SD setting: Faster Diffusion's encoder propagation at its key
steps (sequential, and parallel decoding with prior noise injection: the paper's -27% GFLOPs
setting), DeepCache (branch 1, as its SD 1.5 runs) with a full step every 3 and every 5.

Per plan: model calls (full / partial / cache only), XLA FLOPs of the whole run relative to
plain sampling (each node's FLOPs from XLA's cost analysis, weighed by how often the plan
computes it), and the wall-time speed-up plain / plan at each batch size, the plans compiled
ahead of time, timed round-robin and each time the minimum over `--repeats` rounds. Parallel
decoding runs at most 40 latents per decoder call (`max_decode_batch`: the same FLOPs, in
pieces that fit in 24 GB at B=4). Writes table.md and
results.json; prints the table.

    python experiments/sd_feature_reuse.py [--steps 50] [--batch 1 4] [--repeats 2]
    python experiments/sd_feature_reuse.py --small     # a tiny SD-like UNet: checks the code
"""
from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from difflax.accel import deepcache_plan, encoder_propagation_plan
from difflax.models import SDUNet, SDUNetConfig
from difflax.models.sd_unet import sd_run_fn
from difflax.models.sd_unet_weights import init_sd_unet
from difflax.pipelines import SDScheduler
from difflax.samplers import full_plan, node_flops, plan_cost, sample_with_plan
from difflax.timing import interleaved_times

DECODE_BATCH = 40  # latents per parallel-decoding call: a 15-step chunk at B=4 (guided: 120
# latents) in one call needs more than this machine's 24 GB (3 pieces of 5 steps here)
TINY = SDUNetConfig(sample_size=8, block_out_channels=(16, 32), layers_per_block=(1, 1),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                    attention_head_dim=(2, 2), transformer_layers_per_block=(1, 1),
                    norm_num_groups=8)


def plans(unet, steps):
    """{label: plan}: plain, then each paper's SD setting."""
    return {
        "plain": full_plan(steps),
        "Faster Diffusion, encoder propagation": encoder_propagation_plan(unet, steps),
        "Faster Diffusion, + parallel decoding + noise injection": encoder_propagation_plan(
            unet, steps, parallel=True, noise_injection=0.003, max_decode_batch=DECODE_BATCH),
        "DeepCache N=3 (branch 1)": deepcache_plan(unet, steps, branch=1, interval=3),
        "DeepCache N=5 (branch 1)": deepcache_plan(unet, steps, branch=1, interval=5),
    }


def sampler_fn(unet, config, plan, grid, schedule, args):
    """(variables, context, latents (B, h, w, 4)) -> DDIM samples with guidance 7.5 under
    `plan`, compiled ahead of time for `args` (the parameters are arguments, as in the
    pipeline, not compiled-in constants)."""
    def sample(variables, context, x):
        run = sd_run_fn(unet, variables, context, guidance_scale=7.5)
        return sample_with_plan(run, x, plan=plan, config=config, schedule=schedule,
                                sampler="ddim", grid=grid, prediction="eps")[0]
    return jax.jit(sample).lower(*args).compile()


def run(args):
    config = TINY if args.small else SDUNetConfig(sample_size=32)
    unet, dim = SDUNet(config), 8 if args.small else 768
    variables = init_sd_unet(config, jax.random.key(0), dim)
    scheduler = SDScheduler()
    schedule, grid = scheduler.schedule(), scheduler.grid(args.steps, "ddim")
    size, compared = config.sample_size, plans(unet, args.steps)
    rows = {name: {"plan": name} for name in compared}
    for name, plan in compared.items():
        cost = plan_cost(unet, plan, 1)
        rows[name].update(full=cost.full, partial=cost.partial, free=cost.free, cost=cost)
    for batch in args.batch:
        rng = np.random.default_rng(batch)
        x = jnp.asarray(rng.normal(size=(batch, size, size, 4)), jnp.float32)
        context = jnp.asarray(rng.normal(size=(2 * batch, 77, dim)), jnp.float32)
        if batch == args.batch[0]:  # FLOPs per node, at the first batch size
            run_fn = sd_run_fn(unet, variables, context, guidance_scale=7.5)
            flops = node_flops(unet, run_fn, x, jnp.full((batch,), 500.0))
            for row in rows.values():
                row["flops_vs_plain"] = row.pop("cost").equivalent_nfe(flops) / args.steps
            print("FLOPs vs plain: " + ", ".join(f"{k} {r['flops_vs_plain']:.3f}"
                                                 for k, r in rows.items()), flush=True)
        if args.flops_only:
            continue
        inputs = (variables, context, x)
        fns = {name: functools.partial(sampler_fn(unet, config, plan, grid, schedule, inputs),
                                       *inputs) for name, plan in compared.items()}
        timings = interleaved_times(fns, args.repeats, warmup=False)  # compiled: no warm-up
        seconds = {name: float(t.wall.min()) for name, t in timings.items()}
        for name, row in rows.items():
            row[f"seconds_b{batch}"] = seconds[name]
            row[f"speedup_b{batch}"] = seconds["plain"] / seconds[name]
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
              flush=True)
    return list(rows.values())


def table(rows, args) -> str:
    what = ("a tiny SD-like UNet (--small), 8x8 latents" if args.small else
            "SD 1.5's UNet, random weights, 256x256 images (32x32 latents)")
    timing = "" if args.flops_only else (f"; speed-up = plain / plan wall time, minimum of "
                                         f"{args.repeats} round-robin rounds")
    lines = [f"{what}, DDIM {args.steps} steps, "
             f"guidance 7.5, {jax.devices()[0].platform} x {jax.device_count()}{timing}", "",
             "| plan | model calls full / partial / cache | FLOPs vs plain | "
             + " | ".join(f"speed-up B={b}" for b in args.batch) + " |",
             "|---|---|---|" + "---|" * len(args.batch)]
    for r in rows:
        lines.append(f"| {r['plan']} | {r['full']} / {r['partial']} / {r['free']} | "
                     f"{r['flops_vs_plain']:.2f} | "
                     + " | ".join(f"{r[f'speedup_b{b}']:.2f}x" if f"speedup_b{b}" in r else "-"
                                  for b in args.batch) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--flops-only", action="store_true", help="model calls and FLOPs, no timing")
    p.add_argument("--small", action="store_true", help="a tiny SD-like UNet, 20 DDIM steps, "
                   "batch 1 and 2, one round")
    p.add_argument("--out", default="experiments/results/sd_feature_reuse")
    args = p.parse_args()
    if args.small:
        args.steps, args.batch, args.repeats = 20, [1, 2], 1
    rows = run(args)
    text = table(rows, args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
