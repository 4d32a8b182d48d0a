"""GMem on the digits: fd_digits against training steps for SiT without and with memory.

GMem's claim (Tang et al. 2024, abstract): a SiT conditioned on snippets of an
explicit memory bank trains much faster than the same SiT conditioned on class labels
(46.7x on ImageNet-256). Here both share one network size, data, optimiser, batch and
sampler (configs/digits_sit.py); the only difference is the condition: the class label
(SiT) or the memory snippet of each training image (GMem: a digits classifier's 64-d
features, trained offline with its own seed). Both are evaluated with the EMA weights at
several step counts on the same noise: SiT with uniformly drawn labels, GMem with
snippets drawn from its bank (uniformly: the training distribution of snippets). Then grids
from the final GMem model: bank snippets, snippets of held-out ("new") digits, and linear
and spherical interpolations between two snippets.

    python experiments/gmem.py [--config configs/digits_sit.py[:smoke]] [--out DIR]
                               [--config.train.steps=3200 --config.evaluate.at_steps=...]

Writes DIR/table.md, results.json, fd_vs_steps.png and grids/*.png (default
experiments/results/gmem); prints the table. Each model is trained by `difflax.training.train`
in increments up to each evaluation step (the loop resumes from its checkpoint in a temporary
workdir, so the increments make one run); train_seconds is the wall time of those calls
(compilation and checkpoints included).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from difflax import configs, data
from difflax.gmem import (build_memory_bank, digits_snippet_encoder, get_batches_fn, get_draw_fn,
                          kmeans_compress, lerp, sample_entries, sample_from_bank, slerp,
                          svd_compress)
from difflax.images import save_grid
from difflax.metrics import digits_frechet_metric, digits_logits, evaluate_samples, load_digits_classifier
from difflax.models.sit import SiT, SiTConfig, init_sit
from difflax.training import TrainConfig, make_mesh, train
from difflax.training.interpolant_loss import get_interpolant_loss_fn

SNIPPET_DIM = 64


def sit_config(config, *, memory: bool) -> SiTConfig:
    """The digits SiT of `config`: labels (memory=False) or snippets (memory=True)."""
    m = dict(config.model)
    return SiTConfig(input_size=config.data.resolution, in_channels=1,
                     num_classes=0 if memory else 10, snippet_dim=SNIPPET_DIM if memory else 0,
                     **m)


def split_digits(config):
    """(train images, train labels, new images, new labels): `holdout` digits left out of
    training and of the bank, to encode as new images."""
    x, y = data.load_digits(config.data.resolution)
    perm = np.random.default_rng(config.data.seed).permutation(len(x))
    keep, new = perm[config.data.holdout:], perm[:config.data.holdout]
    return x[keep], y[keep], x[new], y[new]


def make_bank(config, encoder, images):
    bank = build_memory_bank(encoder, images, batch_size=512)
    mem = config.memory
    if mem.kmeans_entries:
        bank = kmeans_compress(bank, mem.kmeans_entries, key=jax.random.key(0))
    if mem.svd_rank:
        bank = svd_compress(bank, mem.svd_rank)
    return bank


def draw_fn(model, config):
    """Jitted draw(params, noise, y, snippet) -> images in [-1, 1] (`difflax.gmem.get_draw_fn`)."""
    s, tr = config.sample, config.transport
    return get_draw_fn(model, interpolant=tr.interpolant, prediction=tr.prediction,
                       method=s.method, steps=s.steps, cfg_scale=s.cfg_scale)


def run_one(name, config, *, memory, train_x, train_y, bank, metric, classify, mesh):
    """Trains one model, evaluating at config.evaluate.at_steps; returns (rows, ema params)."""
    model = SiT(sit_config(config, memory=memory))
    t = dict(config.train)
    t["grad_clip"] = t["grad_clip"] or None
    tr = config.transport
    snippets = np.asarray(bank.snippets_of(jnp.arange(len(train_x)))) if memory else None
    make_batches = get_batches_fn(train_x, train_y, snippets, batch_size=t["batch_size"],
                                  seed=t["seed"])
    loss_fn = get_interpolant_loss_fn(model, interpolant=tr.interpolant, prediction=tr.prediction,
                                      loss_weight=tr.loss_weight or None)
    init = lambda: init_sit(model.config, jax.random.key(t["seed"]))["params"]
    draw = draw_fn(model, config)
    ev, res = config.evaluate, config.data.resolution

    def sample_fn(params, key, b):
        if memory:
            images, idx = sample_from_bank(draw, params, bank, key, b, (res, res, 1),
                                           by=config.memory.sampling)
            return images, None if bank.size != len(train_y) else train_y[np.asarray(idx)]
        k_noise, k_cond = jax.random.split(key)
        noise = jax.random.normal(k_noise, (b, res, res, 1))
        labels = jax.random.randint(k_cond, (b,), 0, 10)
        return draw(params, noise, labels, None), labels

    rows = []

    def evaluate(step, state, loss, train_seconds):
        tic = time.perf_counter()
        out = evaluate_samples(functools.partial(sample_fn, state.ema_params),
                               key=jax.random.key(config.sample.seed), num_samples=ev.num,
                               batch_size=ev.batch_size, frechet_metrics=[metric],
                               classify_fn=classify, progress=False)
        rows.append(dict(model=name, step=step, fd_digits=round(out["fd_digits"], 3),
                         class_accuracy=round(out.get("class_accuracy", float("nan")), 3),
                         loss=round(loss, 4),
                         train_seconds=round(train_seconds, 1),
                         eval_seconds=round(time.perf_counter() - tic, 1),
                         params=sum(x.size for x in jax.tree.leaves(state.params))))
        print(json.dumps(rows[-1]), flush=True)

    train_seconds = 0.0
    with tempfile.TemporaryDirectory() as workdir:
        for step in sorted({s for s in ev.at_steps if s < t["steps"]} | {t["steps"]}):
            tic = time.perf_counter()
            state = train(TrainConfig(**{**t, "steps": step}), model, make_batches, workdir,
                          loss_fn=loss_fn, mesh=mesh, progress=False, init_params_fn=init)
            train_seconds += time.perf_counter() - tic
            with open(os.path.join(workdir, "metrics.jsonl")) as f:
                loss = json.loads(f.readlines()[-1])["loss"]  # the mean of the last log_every
            evaluate(step, state, loss, train_seconds)
    return rows, model, state.ema_params


def write_grids(out_dir, config, model, params, bank, encoder, train_x, new_x):
    """GMem grids: bank snippets, new images' snippets, lerp / slerp between two snippets.

    Rows of 10: the source image (bank / new) then 9 samples with different noise; for the
    interpolations, 10 weights from snippet a to snippet b with one noise per row.
    """
    draw = draw_fn(model, config)
    res = config.data.resolution
    key = jax.random.key(config.sample.seed + 7)
    noise = jax.random.normal(key, (90, res, res, 1))
    rows = 10
    grid_dir = os.path.join(out_dir, "grids")
    idx = np.asarray(sample_entries(bank, jax.random.fold_in(key, 1), rows))
    for name, sources, snippets in (
            ("bank_snippets", train_x[idx] if bank.size == len(train_x) else None,
             bank.lookup(jnp.asarray(idx))),
            ("new_image_snippets", new_x[:rows],
             encoder(jnp.asarray(new_x[:rows])) / jnp.linalg.norm(
                 encoder(jnp.asarray(new_x[:rows])), axis=-1, keepdims=True))):
        samples = np.asarray(draw(params, noise, None, jnp.repeat(snippets, 9, 0))).reshape(
            rows, 9, res, res, 1)
        first = sources if sources is not None else -np.ones((rows, res, res, 1), np.float32)
        tiles = np.concatenate([first[:, None], samples], axis=1).reshape(-1, res, res, 1)
        save_grid(os.path.join(grid_dir, f"{name}.png"), tiles, nrow=10)
    pairs = np.asarray(sample_entries(bank, jax.random.fold_in(key, 2), 2 * 8)).reshape(8, 2)
    a, b = bank.lookup(jnp.asarray(pairs[:, 0])), bank.lookup(jnp.asarray(pairs[:, 1]))
    w = jnp.linspace(0.0, 1.0, 10)
    row_noise = jnp.repeat(noise[:8], 10, 0)
    for name, fn in (("interpolation_lerp", lerp), ("interpolation_slerp", slerp)):
        snips = jnp.swapaxes(fn(a, b, w), 0, 1).reshape(-1, a.shape[-1])  # (8 * 10, D)
        save_grid(os.path.join(grid_dir, f"{name}.png"),
                  np.asarray(draw(params, row_noise, None, snips)), nrow=10)


def steps_to_reach(rows, target):
    """Steps a run needs to reach fd_digits <= target, interpolated log-linearly between its
    evaluations (fd and steps both on log scales); None if it never does, 0 if its first
    evaluation already does."""
    prev = None
    for r in rows:
        if r["fd_digits"] <= target:
            if prev is None:
                return 0
            f = (np.log(prev["fd_digits"]) - np.log(target)) / (
                np.log(prev["fd_digits"]) - np.log(r["fd_digits"]))
            return float(np.exp(np.log(prev["step"]) + f * (np.log(r["step"]) - np.log(prev["step"]))))
        prev = r
    return None


def _reach(gmem, b):
    at = steps_to_reach(gmem, b["fd_digits"])
    if at is None:
        return f"> {gmem[-1]['step']}", None
    if at == 0:
        return f"<= {gmem[0]['step']}", None
    return f"{at:.0f} ({b['step'] / at:.2f}x)", b["step"] / at


def write_results(out_dir, rows, config, seconds):
    base = [r for r in rows if r["model"] == "SiT"]
    gmem = [r for r in rows if r["model"] == "GMem"]
    lines = ["| steps | SiT fd_digits | GMem fd_digits | GMem steps to SiT's fd (speed-up) "
             "| SiT class acc. | GMem snippet-class acc. | SiT loss | GMem loss |",
             "|---|---|---|---|---|---|---|---|"]
    speedups = []
    for b, g in zip(base, gmem):
        text, ratio = _reach(gmem, b)
        speedups.append(ratio)
        lines.append(f"| {b['step']} | {b['fd_digits']:.3f} | {g['fd_digits']:.3f} | {text} | "
                     f"{b['class_accuracy']:.3f} | {g['class_accuracy']:.3f} | {b['loss']:.4f} | "
                     f"{g['loss']:.4f} |")
    final = speedups[-1]
    verdict = (f"At the full budget GMem reaches SiT's final fd_digits "
               f"({base[-1]['fd_digits']:.3f}, {base[-1]['step']} steps) {final:.2f}x faster."
               if final else
               f"At the full budget GMem does not reach SiT's final fd_digits "
               f"({base[-1]['fd_digits']:.3f}) within {gmem[-1]['step']} steps "
               f"(GMem: {gmem[-1]['fd_digits']:.3f}).")
    early = [(b["step"], r) for b, r in zip(base, speedups) if r]
    if early:
        verdict += " Earlier: " + ", ".join(f"SiT's fd at {st} steps is reached {r:.2f}x faster"
                                            for st, r in early) + "."
    s, ev = config.sample, config.evaluate
    notes = (f"{ev.num} samples per cell ({s.method} ODE, {s.steps} steps, cfg {s.cfg_scale}), "
             f"same noise at every step count; parameters: SiT {base[0]['params']:,}, GMem "
             f"{gmem[0]['params']:,}; batch {config.train.batch_size}; total wall time "
             f"{seconds / 60:.1f} min. Real digits score 1.03 at 500 samples (sampling floor).")
    table = "\n".join(lines + ["", verdict, "", notes])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(rows=rows, speedups=speedups, seconds=round(seconds, 1),
                       config=config.to_dict()), f, indent=1, default=list)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, rs in (("SiT (class labels)", base), ("GMem (memory snippets)", gmem)):
        ax.plot([r["step"] for r in rs], [r["fd_digits"] for r in rs], "o-", label=name)
    ax.axhline(1.03, color="gray", ls=":", label="real digits (500 samples)")
    ax.set(xscale="log", yscale="log", xlabel="training steps", ylabel="fd_digits",
           title="SiT vs GMem on the digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fd_vs_steps.png"), dpi=120)
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/digits_sit.py")
    p.add_argument("--out", default="experiments/results/gmem")
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = tuple(a[len("--config."):] for a in argv if a.startswith("--config."))
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    config = configs.load_config(args.config, overrides)
    tic = time.perf_counter()
    mesh = make_mesh()
    train_x, train_y, new_x, _ = split_digits(config)
    clf = load_digits_classifier()
    metric = digits_frechet_metric(clf.params, config.data.resolution)
    classify = lambda x: digits_logits(clf.params, x)
    encoder = digits_snippet_encoder(seed=config.memory.encoder_seed)
    bank = make_bank(config, encoder, train_x)
    common = dict(train_x=train_x, train_y=train_y, bank=bank, metric=metric, classify=classify,
                  mesh=mesh)
    rows, _, _ = run_one("SiT", config, memory=False, **common)
    gmem_rows, model, params = run_one("GMem", config, memory=True, **common)
    write_grids(args.out, config, model, params, bank, encoder, train_x, new_x)
    table = write_results(args.out, rows + gmem_rows, config, time.perf_counter() - tic)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
