"""A-SDM model assembly on any testbed's model: pruned students, distilled, with error bars.

For the teacher (the config's `teacher_workdir` or --workdir: a training run, an exported
testbed folder or a shipped testbed name) and its students (configs/digits_assembly.py,
configs/mnist_assembly.py): parameter count, FLOPs per D(x; sigma) call, wall time of one D
call and of one whole sampling run relative to the teacher (all models timed interleaved in
this one process), and the dataset's Frechet distance (fd_digits or fd_mnist,
`difflax.metrics.dataset_metric`) with its jackknife interval and class accuracy of the same
samples (same noise and labels, >= 2000 by default) after the same distillation budget; each
model's distance minus the teacher's with its paired-jackknife interval, and the verdict on
A-SDM's claim (a faster model of the same quality, within --tolerance times the teacher's
distance; `difflax.metrics.claim_verdict`). Then multi-UNet switching (teacher for the first k
model evaluations, the student after). Writes table.md, results.json and samples.png (one row
per model, one class per column) to --out; students are distilled into <students>/<variant>
(default runs/model_assembly, outside version control) and a rerun resumes them, and the
evaluation's drawn batches are kept in <students>/samples, so an interrupted evaluation
resumes too.

    python experiments/model_assembly.py [--config configs/digits_assembly.py[:smoke]] \
        [--workdir runs/digits | FOLDER | mnist_edm] [--small] [--tolerance 0.05] \
        [--students runs/model_assembly]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import numpy as np

from difflax import configs, data, schedules
from difflax.accel import asdm
from difflax.accel.asdm import DistillConfig, PruningStage
from difflax.images import save_grid
from difflax.samplers import make_grid
from difflax.metrics import claim_verdict, dataset_metric, fingerprint, format_interval
from difflax.timing import interleaved_times
from difflax.training import TrainConfig
from difflax.training.distill import init_student_params, progressive_distill
from difflax.workdir import get_sample_fn, load_run, paired_sample_fn


def variants(c):
    """name -> (surgery fields, distillation weights): each adds one A-SDM component."""
    s, d = c.surgery, c.distill
    weights = dict(task=d.task, output=d.output, features=d.features, semantic=0.0)
    pruned = dict(drop_blocks=tuple(s.drop_blocks))
    condconv = dict(pruned, condconv_experts=s.condconv_experts)
    gri = dict(condconv, attention="gri", gri_window=s.gri_window, gri_pool=s.gri_pool,
               gri_combine=s.gri_combine)
    return {"pruned": (pruned, weights),
            "+ CLME-CondConv": (condconv, weights),
            "+ GRI attention": (gri, weights),
            "+ SAS": (gri, dict(weights, semantic=d.semantic))}


def distill_variant(c, teacher, t_params, surgery, weights, workdir, dataset, semantic_fn):
    d = c.distill
    cfg = TrainConfig(steps=d.steps, batch_size=d.batch_size, lr=d.lr, warmup_steps=d.warmup_steps,
                      ema_halflife_kimg=d.ema_halflife_kimg, log_every=max(d.steps // 4, 1),
                      ckpt_every=d.steps, keep_checkpoints=1, seed=0)
    net = teacher.net
    drop = tuple(surgery["drop_blocks"])
    per = -(-len(drop) // d.stages)  # progressive: a share of the blocks per stage
    stages = [PruningStage(drop[:min(len(drop), per * (i + 1))], d.steps // d.stages)
              for i in range(d.stages)]
    make = lambda blocks: asdm.student(teacher, **dict(surgery, drop_blocks=blocks))
    make_batches = lambda start: data.batch_iterator(
        dataset, d.batch_size, seed=0, start_step=start, resolution=net.img_resolution,
        labels=bool(net.label_dim))
    return progressive_distill(
        make, teacher, t_params, stages, cfg, make_batches, workdir,
        config=DistillConfig(**weights),
        semantic_fn=semantic_fn, progress=False)


def run(c, out_dir, students_dir, tolerance):
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    config, teacher, t_params = load_run(c.teacher_workdir)
    net, dm = teacher.net, dataset_metric(config.data.name)
    semantic_fn = functools.partial(dm.features, dm.load_classifier().params)
    shape = (net.img_resolution, net.img_resolution, net.in_channels)
    models = {"teacher": (teacher, t_params, "-")}
    undistilled = asdm.student(teacher, drop_blocks=tuple(c.surgery.drop_blocks))
    models["pruned, not distilled"] = (undistilled, init_student_params(undistilled, t_params)[0], "0")
    for name, (surgery, weights) in variants(c).items():
        tic = time.time()
        workdir = os.path.join(students_dir, name.replace("+ ", "").replace(" ", "_"))
        student, params = distill_variant(c, teacher, t_params, surgery, weights, workdir,
                                          config.data.name, semantic_fn)
        models[name] = (student, params, str(c.distill.steps))
        print(f"distilled {name}: {time.time() - tic:.0f} s", flush=True)
    e, s = c.evaluate, config.sample
    sampler = lambda d: get_sample_fn(d, sampler=e.sampler, steps=e.steps, sigma_min=s.sigma_min,
                                      sigma_max=s.sigma_max)
    light, l_params, _ = models[c.switch.student]
    grid = make_grid(schedules.edm(s.sigma_min, s.sigma_max), "deis_tab", e.steps)
    for k in c.switch.full_steps:
        multi = asdm.MultiUNetDenoiser(teacher, light, switch=asdm.switch_sigma(grid, k))
        models[f"switch: teacher {k} / {c.switch.student} {e.steps - k} NFE"] = (
            multi, {"full": t_params, "light": l_params}, "-")

    rows, grids, samplers, calls = {}, [], {}, {}
    key, labels = jax.random.key(e.seed), np.arange(c.timing.batch_size) % max(net.label_dim, 1)
    x = jax.random.normal(key, (c.timing.batch_size, *shape))
    sigma = np.full(c.timing.batch_size, 1.0, np.float32)
    for name, (model, params, _) in models.items():
        samplers[name] = sampler(model)[0]
        fn = jax.jit(lambda p, m=model: m.apply({"params": p}, x, sigma, labels))
        calls[name] = functools.partial(fn, params)
    call_time = {n: float(np.median(t.wall))
                 for n, t in interleaved_times(calls, c.timing.repeats).items()}
    sampled = interleaved_times(
        {n: functools.partial(samplers[n], models[n][1], key, labels) for n in models},
        max(c.timing.repeats // 2, 1))
    sample_time = {n: float(np.median(t.wall)) for n, t in sampled.items()}
    images = {n: t.output for n, t in sampled.items()}
    quality = dm.evaluate(paired_sample_fn([(samplers[n], models[n][1]) for n in models],
                                           net.label_dim),
                          key=key, num_samples=e.num, batch_size=e.batch_size,
                          resolution=net.img_resolution, progress=False,
                          settings=len(models), baseline=0,  # the teacher's
                          store=os.path.join(students_dir, "samples"),  # resumes if interrupted
                          store_tag=f"{dm.name} {fingerprint([m[1] for m in models.values()])} "
                                    f"{e.steps} {list(models)}")
    for (name, (model, params, steps)), q in zip(models.items(), quality):
        is_multi = isinstance(model, asdm.MultiUNetDenoiser)
        diff = (q[f"{dm.name}_diff"], (q[f"{dm.name}_diff_ci_low"], q[f"{dm.name}_diff_ci_high"]))
        rows[name] = dict(
            distill_steps=steps,
            params=None if is_multi else asdm.count_params(params),
            mflops=None if is_multi else asdm.denoiser_flops(model, params) / 1e6,
            call_speedup=call_time["teacher"] / call_time[name],
            sample_speedup=sample_time["teacher"] / sample_time[name],
            call_seconds=call_time[name], sample_seconds=sample_time[name], quality=q,
            verdict="-" if name == "teacher" else claim_verdict(
                *diff, "no_worse", tolerance=tolerance * quality[0][dm.name]))
        grids.append(np.asarray(images[name])[:10])  # classes 0..9
        print(name, {k: v for k, v in rows[name].items() if k != "quality"},
              f"{dm.name} {q[dm.name]:.3f}", flush=True)
    table = format_table(rows, c, dm.name, tolerance)
    print(table)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(rows=rows, metric=dm.name, tolerance=tolerance, config=c.to_dict(),
                       seconds=time.time() - t0), f, indent=1, default=list)
    save_grid(os.path.join(out_dir, "samples.png"), np.concatenate(grids), nrow=10)
    print(f"total {time.time() - t0:.0f} s")
    return rows


def format_table(rows, c, name, tolerance):
    e, t = c.evaluate, c.timing
    out = [f"Teacher: {c.teacher_workdir}. Students distilled for {c.distill.steps} steps of "
           f"batch {c.distill.batch_size} each; speed-ups are the teacher's median time over "
           f"the model's, for one D(x; sigma) call and for one {e.sampler}:{e.steps} sampling "
           f"run of {t.batch_size} images, timed interleaved in one process; {name} of {e.num} "
           "samples with its 95% jackknife interval and class accuracy, same noise and labels "
           "for every model; the change is the model's distance minus the teacher's, with its "
           "paired-jackknife interval. Verdict on A-SDM's claim (the same quality): holds if "
           f"the whole interval of the change is at most {tolerance:.0%} of the teacher's "
           "distance, holds partly if the interval straddles that, does not hold here if it "
           "lies above. MFLOPs per image and call (XLA cost analysis).\n",
           "| model | distill steps | params | MFLOPs | D-call speed-up | sampling speed-up "
           f"| {name} | change | verdict | class acc. |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model, r in rows.items():
        q = r["quality"]
        params = "-" if r["params"] is None else f"{r['params']:,}"
        flops = "-" if r["mflops"] is None else f"{r['mflops']:.1f}"
        fd = format_interval(q[name], q[f"{name}_ci_low"], q[f"{name}_ci_high"])
        change = format_interval(q[f"{name}_diff"], q[f"{name}_diff_ci_low"],
                                 q[f"{name}_diff_ci_high"], signed=True)
        out.append(f"| {model} | {r['distill_steps']} | {params} | {flops} | "
                   f"{r['call_speedup']:.2f}x | {r['sample_speedup']:.2f}x | {fd} | {change} | "
                   f"{r['verdict']} | {100 * q['class_accuracy']:.1f}% |")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/digits_assembly.py")
    p.add_argument("--workdir", help="the teacher: a training run, an exported testbed folder "
                   "or a shipped testbed name (default: the config's teacher_workdir)")
    p.add_argument("--out", default="experiments/results/model_assembly")
    p.add_argument("--students", default="runs/model_assembly",
                   help="where the students' training runs (checkpoints) go")
    p.add_argument("--small", action="store_true",
                   help="the config's :smoke variant: every path, a few steps and samples")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="the largest loss of quality the verdict accepts, as a fraction of "
                        "the teacher's distance")
    args, overrides = p.parse_known_args()
    if args.tolerance < 0:
        p.error(f"--tolerance {args.tolerance}: must be >= 0")
    config = args.config + (":smoke" if args.small and ":" not in args.config else "")
    c = configs.load_config(config, tuple(o.removeprefix("--config.") for o in overrides))
    if args.workdir:
        c.teacher_workdir = args.workdir
    run(c, args.out, args.students, args.tolerance)


if __name__ == "__main__":
    main()
