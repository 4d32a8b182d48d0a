"""GMem on the digits: fd_digits against training steps for SiT, GMem, and GMem + REPA.

GMem's claim (Tang et al. 2024, abstract): a SiT conditioned on snippets of an
explicit memory bank trains much faster than the same SiT conditioned on class labels
(46.7x on ImageNet-256). That number compares GMem trained with REPA's alignment loss
(its code: weight 0.5, a projector after block 4 aligned with DINOv2 patch tokens) against
SiT without it. Here three arms share one network size, data, optimiser, batch and sampler
(configs/digits_sit.py): SiT (the class label), GMem (the memory snippet of each training
image: a digits classifier's 64-d features, trained offline with its own seed), and GMem +
REPA (the same, plus REPA's loss on the tokens after block `repa.depth`; the targets are the
same classifier's pooled features of each image, broadcast over the tokens, in place of
DINOv2's patch tokens: the digits have no offline encoder with per-token features). So
"GMem vs SiT" is today's memory-only comparison and "GMem + REPA vs SiT" the setting of the
46.7x. Each is evaluated with the EMA weights at several step counts on the same noise: SiT
with uniformly drawn labels, GMem with snippets drawn from its bank (uniformly: the training
distribution of snippets), fd_digits with its 95% jackknife interval. Then grids from the
final GMem + REPA model: bank snippets, snippets of held-out ("new") digits, and linear and
spherical interpolations between two snippets.

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
from difflax.metrics import (digits_frechet_metric, digits_logits, evaluate_samples,
                             format_interval, load_digits_classifier)
from difflax.models.sit import SiT, SiTConfig, init_sit
from difflax.training import TrainConfig, make_mesh, train
from difflax.training.interpolant_loss import get_interpolant_loss_fn

SNIPPET_DIM = 64
# name -> (memory snippets, REPA): the three arms, in the order they are trained
ARMS = {"SiT": (False, False), "GMem": (True, False), "GMem + REPA": (True, True)}


def sit_config(config, *, memory: bool, repa: bool = False) -> SiTConfig:
    """The digits SiT of `config`: labels (memory=False) or snippets (memory=True), with a
    REPA projector to the snippet encoder's SNIPPET_DIM features if `repa`."""
    m = dict(config.model)
    r = config.repa
    extra = dict(repa_depth=r.depth, repa_dim=SNIPPET_DIM, repa_hidden=r.hidden) if repa else {}
    return SiTConfig(input_size=config.data.resolution, in_channels=1,
                     num_classes=0 if memory else 10, snippet_dim=SNIPPET_DIM if memory else 0,
                     **m, **extra)


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


def run_one(name, config, *, train_x, train_y, features, bank, metric, classify, mesh):
    """Trains arm `name` of ARMS, evaluating at config.evaluate.at_steps; returns (rows,
    model, ema params). `features` (N, SNIPPET_DIM): the encoder's features of train_x, the
    REPA targets."""
    memory, repa = ARMS[name]
    model = SiT(sit_config(config, memory=memory, repa=repa))
    t = dict(config.train)
    t["grad_clip"] = t["grad_clip"] or None
    tr = config.transport
    snippets = np.asarray(bank.snippets_of(jnp.arange(len(train_x)))) if memory else None
    make_batches = get_batches_fn(train_x, train_y, snippets, batch_size=t["batch_size"],
                                  seed=t["seed"], repa_targets=features if repa else None)
    get_loss_fn = lambda sit: get_interpolant_loss_fn(
        sit, interpolant=tr.interpolant, prediction=tr.prediction,
        loss_weight=tr.loss_weight or None, repa_weight=config.repa.weight if repa else 0.0)
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
                               classify_fn=classify, progress=False, bootstrap=ev.bootstrap)
        sizes = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in state.params.items()}
        projector = sum(n for k, n in sizes.items() if k.startswith("repa_projector"))
        rows.append(dict(model=name, step=step, loss=round(loss, 4),
                         train_seconds=round(train_seconds, 1),
                         eval_seconds=round(time.perf_counter() - tic, 1),
                         params=sum(sizes.values()) - projector, repa_projector_params=projector,
                         **{k: round(v, 3) for k, v in out.items() if k != "num_samples"}))
        print(json.dumps(rows[-1]), flush=True)

    train_seconds = 0.0
    with tempfile.TemporaryDirectory() as workdir:
        for step in sorted({s for s in ev.at_steps if s < t["steps"]} | {t["steps"]}):
            tic = time.perf_counter()
            state = train(TrainConfig(**{**t, "steps": step}), model, make_batches, workdir,
                          get_loss_fn=get_loss_fn, mesh=mesh, progress=False,
                          init_params_fn=init)
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


def _reach(arm, b):
    """Text and speed-up of `arm` (rows) reaching the fd_digits of SiT's row `b`."""
    at = steps_to_reach(arm, b["fd_digits"])
    if at is None:
        return f"> {arm[-1]['step']}", None
    if at == 0:
        return f"<= {arm[0]['step']}", None
    return f"{at:.0f} ({b['step'] / at:.2f}x)", b["step"] / at


def _fd(r):
    return format_interval(r["fd_digits"], r["fd_digits_ci_low"], r["fd_digits_ci_high"], digits=2)


def _verdict(name, base, arm, speedups):
    final = speedups[-1]
    text = (f"At the full budget {name} reaches SiT's final fd_digits "
            f"({base[-1]['fd_digits']:.2f}, {base[-1]['step']} steps) {final:.2f}x faster."
            if final else
            f"At the full budget {name} does not reach SiT's final fd_digits "
            f"({base[-1]['fd_digits']:.2f}) within {arm[-1]['step']} steps "
            f"({name}: {arm[-1]['fd_digits']:.2f}).")
    early = [(b["step"], r) for b, r in zip(base[:-1], speedups) if r]
    if early:
        text += " Earlier: " + ", ".join(f"SiT's fd at {st} steps is reached {r:.2f}x faster"
                                         for st, r in early) + "."
    return text


def write_results(out_dir, rows, config, seconds):
    by_arm = {name: [r for r in rows if r["model"] == name] for name in ARMS}
    base, others = by_arm["SiT"], [n for n in ARMS if n != "SiT"]
    lines = ["| steps | " + " | ".join(f"{n} fd_digits" for n in ARMS) + " | "
             + " | ".join(f"{n}: steps to SiT's fd (speed-up)" for n in others) + " | "
             + " | ".join(f"{n} class acc." for n in ARMS) + " |",
             "|---" * (1 + 2 * len(ARMS) + len(others)) + "|"]
    speedups = {n: [] for n in others}
    for i, b in enumerate(base):
        reach = []
        for n in others:
            text, ratio = _reach(by_arm[n], b)
            speedups[n].append(ratio)
            reach.append(text)
        lines.append(f"| {b['step']} | " + " | ".join(_fd(by_arm[n][i]) for n in ARMS) + " | "
                     + " | ".join(reach) + " | "
                     + " | ".join(f"{by_arm[n][i].get('class_accuracy', float('nan')):.3f}"
                                  for n in ARMS) + " |")
    verdicts = [_verdict(n, base, by_arm[n], speedups[n]) for n in others]
    s, ev = config.sample, config.evaluate
    notes = (f"{ev.num} samples per cell ({s.method} ODE, {s.steps} steps, cfg {s.cfg_scale}), "
             f"same noise at every step count; fd_digits with its 95% jackknife interval; "
             f"class acc.: the fraction classified as the label (SiT) or as the digit of the "
             f"snippet's image (GMem). Parameters: " + ", ".join(
                 f"{n} {by_arm[n][0]['params']:,}" for n in ARMS)
             + f" (+ REPA's projector in training, {by_arm['GMem + REPA'][0]['repa_projector_params']:,}); "
             f"REPA weight {config.repa.weight}, after block {config.repa.depth} of "
             f"{config.model.depth}; batch {config.train.batch_size}; total wall time "
             f"{seconds / 60:.1f} min. Real digits score 1.03 at 500 samples (sampling floor).")
    table = "\n".join(lines + [""] + verdicts + ["", notes])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(rows=rows, speedups=speedups, seconds=round(seconds, 1),
                       config=config.to_dict()), f, indent=1, default=list)
    plot(out_dir, by_arm)
    return table


def plot(out_dir, by_arm):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = {"SiT": "SiT (class labels)", "GMem": "GMem (memory snippets)",
              "GMem + REPA": "GMem + REPA"}
    for name, rs in by_arm.items():
        steps = [r["step"] for r in rs]
        ax.plot(steps, [r["fd_digits"] for r in rs], "o-", label=labels[name])
        ax.fill_between(steps, [r["fd_digits_ci_low"] for r in rs],
                        [r["fd_digits_ci_high"] for r in rs], alpha=0.2)
    ax.axhline(1.03, color="gray", ls=":", label="real digits (500 samples)")
    ax.set(xscale="log", yscale="log", xlabel="training steps", ylabel="fd_digits",
           title="SiT, GMem and GMem + REPA on the digits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fd_vs_steps.png"), dpi=120)


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
    features = np.asarray(encoder(jnp.asarray(train_x)))  # REPA's targets, pooled (N, 64)
    common = dict(train_x=train_x, train_y=train_y, features=features, bank=bank, metric=metric,
                  classify=classify, mesh=mesh)
    rows = []
    for name in ARMS:
        arm_rows, model, params = run_one(name, config, **common)
        rows += arm_rows
    write_grids(args.out, config, model, params, bank, encoder, train_x, new_x)
    table = write_results(args.out, rows, config, time.perf_counter() - tic)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
