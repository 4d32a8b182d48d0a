"""`difflax train | sample | evaluate | encode | export | generate`: the command line.

The only place that reads configs.

    difflax train --config configs/digits_edm.py[:smoke] --workdir DIR [--config.train.steps=10]
    difflax sample --workdir DIR [--sampler edm_heun] [--steps 18] [--num 64]
    difflax evaluate --workdir DIR [--sampler edm_heun:18 deis_tab3:10] [--num 1000]
    difflax evaluate --workdir DIR --sampler deis_tab3 --steps 10
    difflax encode --vae VAE_FOLDER --data mnist --out DIR [--resolution 32] [--chunk-size 1024]
                   [--features digits_classifier]     # + GMem snippets
    difflax train --config configs/digits_latent_sit.py[:smoke|:gmem] --workdir DIR  # SiT
    difflax sample --workdir DIR [--sampler heun] [--vae VAE_FOLDER]  # decoded latents
    difflax sample --sit SiT-XL-2-256x256.pt --vae SD_VAE --out STEM [--classes 207,360]  # SiT's
    difflax export --workdir DIR --out FOLDER       # EMA weights + config, for load_testbed
    difflax generate --model SD_FOLDER --prompt "..." --out grid.png [--sampler ddim] [--steps 50]

Bad input (an unknown config key or choice, a value out of range, a batch that does not
split over the devices, an image size the model does not take, a checkpoint from another
architecture) ends with one line naming the key or flag, its value and what is allowed,
exit code 2, before anything is compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from difflax import configs, latent_runs, workdir as wd
from difflax.images import save_grid
from difflax.training import train as train_loop
from difflax.training.checkpoint import CheckpointMismatchError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difflax", description=__doc__.split("\n")[0])
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first; on a TPU pod slice (or a "
                        "cluster JAX detects, e.g. SLURM) it finds the processes itself")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="multi-process run with an explicit coordinator (process 0's address); "
                        "needs --num-processes and --process-id")
    p.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    p.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. N-1")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a denoiser; resumes from the workdir's checkpoint")
    t.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    t.add_argument("--workdir", required=True)
    s = sub.add_parser("sample", help="PNG grid + .npz of samples of a run or SiT weights")
    w = s.add_mutually_exclusive_group(required=True)
    w.add_argument("--workdir", help="a run of `difflax train`")
    w.add_argument("--sit", help="willisma/SiT weights (.pt, e.g. SiT-XL-2-256x256.pt, or .npz) "
                   "decoded with --vae; SiTConfig fields as --sit.FIELD=VALUE (num_classes=10)")
    s.add_argument("--sampler", help="sampler name (default: the config's), e.g. edm_heun, deis_tab3")
    s.add_argument("--steps", type=int, help="sampler steps (default: the config's)")
    s.add_argument("--num", type=int, help="number of samples (default: the config's)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--out", help="output stem (default: WORKDIR/samples/SAMPLER_STEPS)")
    s.add_argument("--vae", help="SiT: the VAE folder that decodes the latents (a run's "
                   "default: the one its latents.json records)")
    s.add_argument("--sit-model", default="SiT-XL/2", help="--sit: SiT-{S,B,L,XL}/{2,4,8}")
    s.add_argument("--image-size", type=int, default=256, help="--sit: pixels (SiT's)")
    s.add_argument("--classes", help="--sit: comma-separated labels (default: SiT sample.py's "
                   "207,360,387,974,88,979,417,279)")
    s.add_argument("--cfg-scale", type=float, default=4.0, help="--sit: guidance on the first "
                   "three latent channels, as SiT's forward_with_cfg (1: none)")
    s.add_argument("--dtype", default="float32", help="--sit: float32 or bfloat16 (SiT and "
                   "VAE decoder)")
    e = sub.add_parser("evaluate", help="sample N images per sampler and report metrics")
    e.add_argument("--workdir", required=True)
    e.add_argument("--sampler", nargs="+",
                   help="NAME:STEPS ..., or NAME ... with --steps (default: the config's)")
    e.add_argument("--steps", type=int, help="steps for every --sampler given without :STEPS")
    e.add_argument("--num", type=int, help="samples per sampler (default: the config's)")
    e.add_argument("--batch-size", type=int, help="samples per batch (default: the config's)")
    e.add_argument("--inception", help="FID: pytorch-fid's pt_inception-2015-12-05-*.pth (or .npz)")
    e.add_argument("--reference", help="FID: reference statistics .npz (mu, sigma)")
    e.add_argument("--vae", help="SiT runs: the VAE folder (default: latents.json's)")
    c = sub.add_parser("encode", help="encode an image dataset and its horizontal flips into "
                       "VAE latents (resumable chunks)")
    c.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (config.json + "
                   "*.safetensors)")
    c.add_argument("--data", required=True,
                   help=f"one of {', '.join(latent_runs.ENCODE_DATASETS)}")
    c.add_argument("--out", required=True, help="output directory (latents.json + chunk_*.npz)")
    c.add_argument("--resolution", type=int, help="image size (default: the dataset's)")
    c.add_argument("--split", default="train", help="MNIST split: train or test")
    c.add_argument("--chunk-size", type=int, default=1024, help="images per chunk file")
    c.add_argument("--features", help="also store GMem memory snippets of each image and flip: "
                   f"one of {', '.join(latent_runs.ENCODE_FEATURES)}")
    x = sub.add_parser("export", help="the run's newest EMA weights + config.json into a folder "
                       "that difflax.load_testbed reads")
    x.add_argument("--workdir", required=True)
    x.add_argument("--out", required=True, help="output folder")
    g = sub.add_parser("generate", help="Stable Diffusion text -> image: a PNG grid from a local "
                       "diffusers folder")
    g.add_argument("--model", required=True, help="diffusers StableDiffusionPipeline folder "
                   "(unet/ text_encoder/ tokenizer/ vae/ scheduler/)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="", help="the unconditional branch's prompt")
    g.add_argument("--sampler", default="ddim", help="a difflax sampler name (ddim, dpmpp_2m, "
                   "unipc, deis_tab, ...)")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale "
                   "(<= 1: none)")
    g.add_argument("--seed", type=int, default=0, help="image i uses fold_in(key(seed), i)")
    g.add_argument("--num", type=int, default=1, help="images of the prompt")
    g.add_argument("--height", type=int, help="pixels (default: the UNet's sample size x 8)")
    g.add_argument("--width", type=int, help="pixels (default: the UNet's sample size x 8)")
    g.add_argument("--dtype", default="float32", help="float32 or bfloat16 (UNet and VAE)")
    g.add_argument("--plan", default="none", help="feature reuse: none, faster_diffusion (its "
                   "SD setting: key steps, parallel decoding, noise injection 0.003) or "
                   "deepcache:N (a full step every N, the paper's SD branch)")
    g.add_argument("--out", required=True, help="PNG path of the image grid")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = tuple(a[len("--config."):] for a in argv if a.startswith("--config."))
    args = _parser().parse_args([a for a in argv if not a.startswith(("--config.", "--sit."))])
    args.sit_fields = tuple(a[len("--sit."):] for a in argv if a.startswith("--sit."))
    try:
        _initialize_distributed(args)
        commands = {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate,
                    "encode": cmd_encode, "export": cmd_export, "generate": cmd_generate}
        return commands[args.command](args, overrides)
    except (ValueError, FileNotFoundError, CheckpointMismatchError) as error:
        print(f"difflax: error: {error}", file=sys.stderr)
        return 2


def _initialize_distributed(args) -> None:
    """Joins a multi-process run: explicit (--coordinator, --num-processes, --process-id) or
    auto-detected (--distributed: TPU pods, SLURM, ...). Every process runs the same command."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator HOST:PORT, --num-processes N and --process-id I go "
                             "together; give all three (or --distributed to auto-detect)")
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--coordinator {args.coordinator!r} must be HOST:PORT, "
                             "e.g. 10.0.0.1:1234 (process 0's address)")
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            raise ValueError(f"--process-id {args.process_id} must be in 0..N-1 for "
                             f"--num-processes N={args.num_processes} (N >= 1)")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


def cmd_train(args, overrides) -> int:
    config = configs.load_config(args.config, overrides)
    configs.check_config(config, jax.device_count())
    model = configs.model_from_config(config)
    cfg = configs.train_config(config)
    wd.save_config(args.workdir, config)
    make_batches, get_loss_fn = _kind(config).training_fns(config, model, cfg)
    sample, nfe, sampler, steps = _sampler(model, config)
    s = config.sample
    grid_fn = ((lambda params, step: _draw(config, model, sample, params, s.num, s.seed)[0])
               if cfg.sample_every else None)
    tic = time.perf_counter()
    state = train_loop(cfg, model, make_batches, args.workdir, get_loss_fn=get_loss_fn,
                       sample_fn=grid_fn, run_config=config.to_dict())
    seconds = time.perf_counter() - tic
    path = _write_samples(args.workdir, config, model, state.ema_params, sample,
                          f"{sampler}_{steps}")
    _print_table([{"steps": int(state.step), "train_seconds": round(seconds, 1),
                   "grid": path, "grid_nfe": nfe}])
    return 0


def _kind(config) -> wd.RunKind:
    """What a run of this config's kind does (`difflax.workdir.RunKind`)."""
    return latent_runs.SIT_RUN if configs.model_kind(config) == "sit" else wd.UNET_RUN


def _check_sampler(spec: str) -> None:
    """Checks NAME:STEPS before a run is loaded: a sampler of a UNet run or a SiT run."""
    name = spec.partition(":")[0]
    configs.parse_sampler(spec, "sit" if name in configs.SIT_ODE_METHODS else "unet")


def _check_args(args, **minimum) -> None:
    """Each given flag (name=minimum, e.g. num=1) must be an integer >= its minimum."""
    for name, lo in minimum.items():
        value = getattr(args, name)
        if value is not None and value < lo:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be an integer >= {lo}")


def _sampler(model, config, sampler=None, steps=None, vae=None):
    """(sample fn, nfe, sampler, steps), defaults from the config's `sample` section; a SiT
    run's decodes with `vae` (default: the folder its latents.json records)."""
    kind = _kind(config)
    sampler = kind.default_sampler(config) if sampler is None else sampler
    steps = config.sample.steps if steps is None else steps
    sample, nfe = kind.sample_fn(config, model, sampler, steps, vae)
    return sample, nfe, sampler, steps


def _draw(config, model, sample, params, num, seed):
    """(images (num, H, W, C) in [-1, 1], labels or None, {name: array} to save too) from a
    `_sampler` sample fn."""
    return _kind(config).draw(model, sample, params, num, jax.random.key(seed))


def _write_samples(workdir, config, model, params, sample, name, *, num=None, seed=None,
                   out=None):
    """Writes a PNG grid and an .npz of `num` samples (`_draw`); returns the PNG path."""
    s = config.sample
    num, seed = s.num if num is None else num, s.seed if seed is None else seed
    images, labels, arrays = _draw(config, model, sample, params, num, seed)
    images = np.asarray(images)
    arrays.update(images=images, **({} if labels is None else {"labels": np.asarray(labels)}))
    nrow = _kind(config).grid_columns(model)
    out = out or os.path.join(workdir, "samples", name)
    if jax.process_index() == 0:
        save_grid(out + ".png", images, nrow=min(nrow or int(np.ceil(np.sqrt(num))), num))
        np.savez(out + ".npz", **arrays)
    return out + ".png"


def cmd_sample(args, overrides) -> int:
    _check_args(args, steps=1, num=1, seed=0)
    if args.sit:  # pretrained SiT weights, SiT's ODE sampler (default dopri5)
        _print_table([latent_runs.sample_pretrained_sit(
            args.sit, args.vae, args.out or "sit_samples", model=args.sit_model,
            image_size=args.image_size, fields=configs.sit_fields(args.sit_fields),
            classes=args.classes, num=args.num, cfg_scale=args.cfg_scale,
            method=args.sampler or "dopri5", steps=args.steps or 50, seed=args.seed or 0,
            dtype=args.dtype)])
        return 0
    if args.sampler is not None:
        _check_sampler(f"{args.sampler}:{args.steps or 1}")  # a known name
    config, denoiser, params = wd.load_run(args.workdir)
    sample, nfe, sampler, steps = _sampler(denoiser, config, args.sampler, args.steps, args.vae)
    path = _write_samples(args.workdir, config, denoiser, params, sample, f"{sampler}_{steps}",
                          num=args.num, seed=args.seed, out=args.out)
    _print_table([{"sampler": sampler, "nfe": nfe, "grid": path}])
    return 0


def cmd_evaluate(args, overrides) -> int:
    from difflax import metrics  # heavy: only evaluate needs it

    _check_args(args, steps=1, num=1, batch_size=1)
    specs = [f"{spec}:{args.steps}" if ":" not in spec and args.steps else spec
             for spec in args.sampler or ()]
    for spec in specs:
        _check_sampler(spec)
    config, denoiser, params = wd.load_run(args.workdir)
    e = config.evaluate
    num = e.num if args.num is None else args.num
    batch = e.batch_size if args.batch_size is None else args.batch_size
    dataset, resolution, sample_fn_of = _kind(config).evaluation_data(config, denoiser, params)
    rows = []
    for spec in specs or e.samplers:
        name, steps = configs.parse_sampler(spec, configs.model_kind(config))
        sample, nfe, _, _ = _sampler(denoiser, config, name, steps, args.vae)
        sample_fn = sample_fn_of(sample)
        key = jax.random.key(config.sample.seed)
        tic = time.perf_counter()
        if dataset in metrics.DATASET_METRICS:
            evaluate = metrics.dataset_metric(dataset).evaluate
            result = evaluate(sample_fn, key=key, num_samples=num, batch_size=batch,
                              resolution=resolution)
        else:
            result = metrics.evaluate_samples(
                sample_fn, key=key, num_samples=num, batch_size=batch,
                frechet_metrics=[_fid_metric(metrics, args)])
        rows.append({"sampler": name, "steps": steps, "nfe": nfe, **result,
                     "seconds": round(time.perf_counter() - tic, 1)})
        _write_samples(args.workdir, config, denoiser, params, sample, f"{name}_{steps}")
    if jax.process_index() == 0:
        with open(os.path.join(args.workdir, "eval.json"), "w") as f:
            json.dump(rows, f, indent=2)
    _print_table(rows)
    return 0





def cmd_encode(args, overrides) -> int:
    num, paths = latent_runs.encode(args.vae, args.data, args.out, resolution=args.resolution,
                        split=args.split, chunk_size=args.chunk_size, features=args.features)
    _print_table([{"images": num, "chunks": len(paths), "out": args.out}])
    return 0


def cmd_export(args, overrides) -> int:
    from difflax.testbeds import export_params

    config, _, params = wd.load_run(args.workdir)
    if jax.process_index() == 0:
        export_params(config, params, args.out)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    _print_table([{"workdir": args.workdir, "out": args.out, "megabytes": round(size / 2**20, 2)}])
    return 0


def cmd_generate(args, overrides) -> int:
    from difflax.pipelines import StableDiffusion

    _check_args(args, steps=1, num=1, seed=0, height=1, width=1)
    if not args.out.endswith(".png"):
        raise ValueError(f"--out {args.out!r}: must end with .png")
    sd = StableDiffusion.from_pretrained(args.model)
    plan = _generate_plan(args.plan, sd.unet, args.steps)
    tic = time.perf_counter()
    images = sd.generate([args.prompt] * args.num, negative_prompt=args.negative_prompt,
                         steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance,
                         seed=args.seed, height=args.height, width=args.width, dtype=args.dtype,
                         plan=plan)
    seconds = time.perf_counter() - tic
    if jax.process_index() == 0:
        save_grid(args.out, images * 2 - 1, nrow=int(np.ceil(np.sqrt(args.num))))
    _print_table([{"sampler": args.sampler, "steps": args.steps, "plan": args.plan,
                   "nfe": sd.nfe(args.steps, args.sampler), "guidance": args.guidance,
                   "dtype": args.dtype, "images": args.num, "size": f"{images.shape[2]}x"
                   f"{images.shape[1]}", "seconds": round(seconds, 1), "out": args.out}])
    return 0


def _generate_plan(name: str, unet, steps: int):
    """--plan of `difflax generate` -> a FeaturePlan (None for "none"): Faster Diffusion's SD
    setting (Sec. 3.4, 4: its key steps for `steps`, parallel decoding, prior noise injection
    0.003) or DeepCache's SD 1.5 runs (branch 1: cache_layer_id = cache_block_id = 0) with a
    full step every N."""
    from difflax.accel import deepcache_plan, encoder_propagation_plan

    kind, _, arg = name.partition(":")
    if kind == "none" and not arg:
        return None
    if kind == "faster_diffusion" and not arg:
        return encoder_propagation_plan(unet, steps, parallel=True, noise_injection=0.003)
    if kind == "deepcache" and arg.isdigit() and int(arg) >= 1:
        return deepcache_plan(unet, steps, branch=1, interval=int(arg))
    raise ValueError(f"unknown --plan {name!r}; valid: none, faster_diffusion, deepcache:N "
                     "(N >= 1)")


def _fid_metric(metrics, args):
    if not (args.inception and args.reference):
        raise ValueError("FID on this dataset needs --inception PATH (pytorch-fid's "
                         "pt_inception-2015-12-05-*.pth) and --reference STATS.npz (mu, sigma)")
    return metrics.inception_frechet_metric(metrics.load_inception(args.inception), args.reference)


def _print_table(rows: list[dict]) -> None:
    if jax.process_index() != 0:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


if __name__ == "__main__":
    sys.exit(main())
