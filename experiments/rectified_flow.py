"""2-rectified flow++ (Lee, Lin & Fanti 2024, rfpp) on the digits: is one well-trained Reflow
round enough for 1-2 NFE, and do the U-shaped time distribution and the LPIPS-Huber premetric
beat uniform time + L2 (rfpp Table 1, Sec. 3)?

1. Reflow pairs (z, x): x from the teacher's PF-ODE (the default job's model, runs/digits,
   DEIS tAB3) from noise z; chunked on disk, resumable.
2. Three 2-rectified flows, each initialised from the teacher (rfpp Sec. 4) and trained for
   the same steps on the same pairs: uniform time + squared L2 (the 2-RF baseline of Liu et
   al.), U-shaped time + pseudo-Huber, U-shaped time + LPIPS-Huber (rfpp's recipe).
3. fd_digits / class accuracy at 1 and 2 NFE (RF Euler; rfpp's re-noising sampler is the
   same update at 1 and 2 steps, see difflax/samplers/flow.py), straightness (8 Euler
   steps), for these and for the teacher itself: at its usual NFE, and re-expressed on the
   rectified-flow path at 1 and 2 NFE (= each 2-RF before training).

Writes table.md, results.json and PNG grids (each column one class) to
experiments/results/rectified_flow/; pairs and the 2-RF runs go to --workdir.

    python experiments/rectified_flow.py [--config configs/digits_rf.py[:smoke]]
        [--workdir runs/digits_rf] [--config.train.steps=400] ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from difflax import configs  # noqa: E402
from difflax.images import save_grid  # noqa: E402
from difflax.metrics import evaluate_digits  # noqa: E402
from difflax.metrics.lpips import get_lpips_fn, load_lpips, random_lpips_params  # noqa: E402
from difflax.rfpp import (TimeDistribution, generate_pairs,  # noqa: E402
                          get_rectified_flow_loss_fn, get_rectified_flow_sample_fn,
                          get_teacher_sample_fn, load_pairs, pair_batches, rf_grid, rf_schedule,
                          straightness)
from difflax.samplers import denoiser_model  # noqa: E402
from difflax.training import make_mesh, train  # noqa: E402
from difflax.configs import parse_sampler  # noqa: E402
from difflax.workdir import load_run  # noqa: E402

OUT = os.path.join(ROOT, "experiments", "results", "rectified_flow")
VARIANTS = [("2-RF: uniform + L2 (baseline)", "uniform_l2", dict(time_dist="uniform", premetric="l2_squared")),
            ("2-RF++: U-shaped + pseudo-Huber", "ushaped_huber",
             dict(time_dist="u_shaped", premetric="pseudo_huber")),
            ("2-RF++: U-shaped + LPIPS-Huber", "ushaped_lpips_huber",
             dict(time_dist="u_shaped", premetric="lpips_huber"))]


def load_teacher(config, mesh):
    """(denoiser, params) of the teacher: an EDM weights file, or a difflax training run."""
    t = config.teacher
    if t.edm_weights:
        from difflax.models import load_edm
        denoiser, variables = load_edm(t.edm_weights)
        return denoiser, variables["params"]
    if not os.path.exists(os.path.join(t.workdir, "config.json")):
        sys.exit(f"no teacher run at {t.workdir}: make it first with `difflax train --config "
                 f"configs/digits_edm.py --workdir {t.workdir}` (about 8 min on 2 CPU cores)")
    _, denoiser, params = load_run(t.workdir, mesh)
    return denoiser, params


def lpips_from_config(rf):
    """(lpips_fn, description): real weights from rf.lpips_backbone, else a random VGG."""
    if rf.lpips_backbone and os.path.exists(rf.lpips_backbone):
        params, what = load_lpips(rf.lpips_net, backbone_path=rf.lpips_backbone), "ImageNet"
    elif rf.lpips_backbone and rf.premetric.startswith("lpips"):
        load_lpips(rf.lpips_net, backbone_path=rf.lpips_backbone)  # raises: where to get it
    else:
        params, what = random_lpips_params(rf.lpips_net, seed=rf.lpips_seed), "random"
    fn = get_lpips_fn(params, rf.lpips_net, resolution=rf.lpips_resolution or None,
                      pooling=rf.lpips_pooling)
    return fn, f"LPIPS-{rf.lpips_net} ({what} backbone, lpips v0.1 heads, {rf.lpips_pooling} pool)"


def loss_from_config(rf, denoiser):
    time_dist = TimeDistribution(rf.time_dist, a=rf.a, mean=rf.logit_mean, std=rf.logit_std)
    lpips_fn = lpips_from_config(rf)[0] if rf.premetric.startswith("lpips") else None
    return get_rectified_flow_loss_fn(denoiser, time_dist=time_dist, premetric=rf.premetric,
                                      huber_c_scaling=rf.huber_c_scaling, lpips_fn=lpips_fn,
                                      lpips_div_t=rf.lpips_div_t)


def evaluate(sample_fn, params, denoiser, config, key, grid_path):
    """fd_digits / class accuracy of sample_fn(params, noise, labels), labels cycling 0..9;
    the first 100 images of the first batch go to a PNG grid (one class per column)."""
    shape, classes = denoiser.input_shape, max(denoiser.net.label_dim, 1)
    first = []

    def draw(k, n):
        labels = jnp.arange(n) % classes
        images = jnp.clip(sample_fn(params, jax.random.normal(k, (n, *shape)), labels), -1, 1)
        if not first:
            first.append(images)
        return images, labels

    if config.data.name == "digits":
        r = evaluate_digits(draw, key=key, num_samples=config.evaluate.num,
                            batch_size=config.evaluate.batch_size, resolution=shape[0],
                            progress=False)
    else:
        r = {}
        draw(key, config.evaluate.batch_size)
    save_grid(grid_path, np.asarray(first[0][:100]), nrow=10)
    return r


def get_straightness_fn(denoiser, config):
    """fn(params, key) -> mean straightness of the flow over evaluate.straightness_num noises."""
    shape, classes = denoiser.input_shape, max(denoiser.net.label_dim, 1)
    n = config.evaluate.straightness_num
    labels = jnp.arange(n) % classes
    model = denoiser_model(denoiser, rectified_flow=True)
    grid = rf_grid(config.evaluate.straightness_steps)
    fn = jax.jit(lambda p, z: jnp.mean(straightness(model(p, labels, None), z,
                                                    schedule=rf_schedule(), grid=grid,
                                                    prediction="x0")))
    return lambda params, key: float(fn(params, jax.random.normal(key, (n, *shape))))


def rf_rows(name, params, denoiser, config, samplers, out_dir, tag, extra):
    """One row per RF sampler in `samplers` ({spec: (fn, nfe)}, compiled once, reused)."""
    rows = []
    for spec, (fn, nfe) in samplers.items():
        t0 = time.time()
        r = evaluate(fn, params, denoiser, config, jax.random.key(100 + nfe),
                     os.path.join(out_dir, f"{tag}_{nfe}nfe.png"))
        rows.append(dict(model=name, sampler=parse_sampler(spec)[0], nfe=nfe, **r,
                         eval_seconds=time.time() - t0, **extra))
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    overrides = tuple(a[len("--config."):] for a in argv if a.startswith("--config."))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "digits_rf.py"))
    p.add_argument("--workdir", default="runs/digits_rf")
    p.add_argument("--out", default=OUT)
    p.add_argument("--variants", default=",".join(v[1] for v in VARIANTS))
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    config = configs.load_config(args.config, overrides)
    os.makedirs(args.out, exist_ok=True)
    mesh = make_mesh()
    start = time.time()
    denoiser, teacher = load_teacher(config, mesh)
    shape = denoiser.input_shape

    # 1. pairs from the teacher's PF-ODE
    t = config.teacher
    teacher_fn, teacher_nfe = get_teacher_sample_fn(denoiser, sampler=t.sampler, steps=t.steps,
                                                    sigma_min=t.sigma_min, sigma_max=t.sigma_max,
                                                    mesh=mesh)
    t0 = time.time()
    pairs_dir = os.path.join(args.workdir, "pairs")
    generate_pairs(teacher_fn, teacher, pairs_dir, num_pairs=config.reflow.num_pairs,
                   chunk_size=config.reflow.chunk_size, shape=shape,
                   num_classes=denoiser.net.label_dim, seed=config.reflow.seed,
                   info=dict(teacher=t.edm_weights or t.workdir, sampler=t.sampler, steps=t.steps))
    pairs = load_pairs(pairs_dir)
    pair_seconds = time.time() - t0
    print(f"{len(pairs['labels'])} pairs ({t.sampler}, {teacher_nfe} NFE) in {pair_seconds:.0f} s",
          flush=True)

    # 2. the teacher: usual NFE, and on the rectified-flow path at 1-2 NFE (2-RF at step 0)
    rows = []
    ev_name, ev_steps = parse_sampler(t.eval_sampler)
    fn, nfe = get_teacher_sample_fn(denoiser, sampler=ev_name, steps=ev_steps, sigma_min=t.sigma_min,
                                    sigma_max=t.sigma_max, mesh=mesh)
    r = evaluate(fn, teacher, denoiser, config, jax.random.key(99),
                 os.path.join(args.out, f"teacher_{nfe}nfe.png"))
    straightness_fn = get_straightness_fn(denoiser, config)
    straight = straightness_fn(teacher, jax.random.key(5))
    rows.append(dict(model="teacher (EDM PF-ODE)", sampler=ev_name, nfe=nfe, **r,
                     straightness=straight, train_seconds=0.0))
    samplers = {spec: get_rectified_flow_sample_fn(denoiser, sampler=parse_sampler(spec)[0],
                                                   steps=parse_sampler(spec)[1], mesh=mesh)
                for spec in config.evaluate.samplers}
    rows += rf_rows("teacher on the RF path (no Reflow)", teacher, denoiser, config, samplers,
                    args.out, "teacher_rf", dict(straightness=straight, train_seconds=0.0))
    print(json.dumps(rows[-1]), flush=True)

    # 3. the 2-rectified flows
    cfg = configs.train_config(config)
    chosen = args.variants.split(",")
    lpips_note = lpips_from_config(config.rf)[1] if config.rf.premetric.startswith("lpips") else ""
    for label, tag, rf_override in VARIANTS:
        if tag not in chosen:
            continue
        rf = config.rf.copy_and_resolve_references()
        rf.update(rf_override)
        t0 = time.time()
        state = train(cfg, denoiser, lambda s: pair_batches(pairs, cfg.batch_size, seed=cfg.seed,
                                                            start_step=s),
                      os.path.join(args.workdir, tag),
                      get_loss_fn=lambda m: loss_from_config(rf, m),
                      init_params_fn=lambda: teacher, mesh=mesh)
        seconds = time.time() - t0
        params = state.ema_params
        straight = straightness_fn(params, jax.random.key(5))
        rows += rf_rows(label, params, denoiser, config, samplers, args.out, tag,
                        dict(straightness=straight, train_seconds=seconds))
        print(json.dumps(rows[-2:]), flush=True)

    total = time.time() - start
    table = format_table(rows, config, teacher_nfe, len(pairs["noise"]), pair_seconds, total,
                         lpips_note, args)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(rows=rows, config=json.loads(config.to_json()), seconds=total), f, indent=1)


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def format_table(rows, config, teacher_nfe, num_pairs, pair_seconds, total, lpips_note, args):
    lines = ["| model | sampler | NFE | fd_digits | class_accuracy | straightness | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['nfe']} | {_fmt(r.get('fd_digits'))} | "
                     f"{_fmt(r.get('class_accuracy'))} | {_fmt(r['straightness'], '.4f')} | "
                     f"{r['train_seconds']:.0f} |")
    by = {(r["model"], r["nfe"]): r.get("fd_digits") for r in rows}
    verdicts = []
    names = [v[0] for v in VARIANTS]
    for nfe in (1, 2):
        fds = [by.get((n, nfe)) for n in names]
        if None not in fds:
            order = " < ".join(n.split(": ")[1] for _, n in sorted(zip(fds, names)))
            holds = fds[2] <= fds[1] <= fds[0]
            verdicts.append(f"NFE {nfe}: fd_digits order {order} -- the paper's ordering "
                            f"(LPIPS-Huber < pseudo-Huber < L2) {'holds' if holds else 'does not hold'}.")
    c = config
    notes = [
        "",
        f"Teacher: {c.teacher.edm_weights or c.teacher.workdir}; {num_pairs} Reflow pairs from its "
        f"PF-ODE ({c.teacher.sampler}, {teacher_nfe} NFE) in {pair_seconds:.0f} s. Each 2-RF starts "
        f"from the teacher's weights and trains {c.train.steps} steps of batch {c.train.batch_size} "
        f"(lr {c.train.lr}); samples use its EMA weights. U-shaped: a = {c.rf.a}. "
        f"Pseudo-Huber c = 0.00054 d ({c.rf.huber_c_scaling!r} scaling). "
        + (f"LPIPS: {lpips_note}, images resized to {c.rf.lpips_resolution or 'native'} px "
           "(no ImageNet backbone weights offline)." if lpips_note else ""),
        f"fd_digits / class_accuracy over {c.evaluate.num} samples (labels cycling 0-9); "
        f"straightness over {c.evaluate.straightness_num} noises along {c.evaluate.straightness_steps} "
        "Euler steps (rfpp `utils.straightness`; 0 = straight). 'teacher on the RF path' is the "
        "teacher re-expressed as a velocity (= every 2-RF at step 0).",
        "", *verdicts, "",
        f"Command: `python experiments/rectified_flow.py --config {os.path.relpath(args.config.split(':')[0], ROOT)}"
        f"{':' + args.config.split(':')[1] if ':' in args.config else ''} --workdir {args.workdir}`; "
        f"{total / 60:.1f} min wall on this machine.",
    ]
    return "\n".join(lines + notes) + "\n"


if __name__ == "__main__":
    main()
