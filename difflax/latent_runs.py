"""SiT and GMem runs on stored latents (configs with `model.kind = "sit"`): what `difflax train
| sample | evaluate` need beyond a UNet run.

    difflax encode --vae VAE --data digits --out LATENTS [--features digits_classifier]
    difflax train --config configs/digits_latent_sit.py --workdir RUN
    difflax sample --workdir RUN [--vae VAE]
    difflax sample --sit SiT-XL-2-256x256.pt --vae SD_VAE --out grid   # pretrained weights

Training (SiT, Ma et al. 2024, Sec. 3; GMem, Tang et al. 2024, Sec. 3): each example is a
fresh posterior sample z of a stored image or its flip, scaled once by the VAE's factor
(`difflax.latents.latent_batches`), with its label and, for GMem, the stored snippet of the
same flip; the loss is SiT's interpolant loss; the loop is `difflax.training.train`
(checkpoints, resume, EMA, sharding). Sampling: SiT's probability-flow ODE from N(0, I)
latents, conditioned on labels (one class per grid column) or on snippets drawn from the
stored bank (GMem Sec. 3-4), then unscaled and decoded by the VAE whose folder latents.json
records (`AutoencoderKL.decode_latents`); images of a one-channel dataset (encoded as three
equal channels) are averaged back to one channel. Pretrained SiT weights sample through
`difflax.pipelines.SiTPipeline` (`sample_pretrained_sit`).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from difflax import configs, data
from difflax.gmem import MemoryBank, digits_snippet_encoder, get_draw_fn, l2_normalize, sample_entries
from difflax.images import save_grid
from difflax.latents import (encode_dataset, latent_batches, latents_info, load_latents,
                             load_snippets, vae_config)
from difflax.models import load_vae
from difflax.training.interpolant_loss import get_interpolant_loss_fn
from difflax.workdir import RunKind

# datasets `difflax encode` reads: name -> (resolution, split) -> (images, labels)
ENCODE_DATASETS = {
    "digits": lambda resolution, split: data.load_digits(resolution or 16),
    "mnist": lambda resolution, split: data.load_mnist(split, resolution or 32),
}


def digits_snippets():
    """fn(images (B, R, R, 1)) -> (B, 64) unit snippets: `difflax.gmem.digits_snippet_encoder`
    features, L2-normalised (GMem's bank entries, Sec. 3)."""
    encoder = digits_snippet_encoder()
    return lambda images: l2_normalize(encoder(images))


# `difflax encode --features`: name -> () -> fn(images) -> (B, D) unit snippets
ENCODE_FEATURES = {"digits_classifier": digits_snippets}


def encode(vae_path: str, dataset: str, out_dir: str, *, resolution: int | None = None,
           split: str = "train", chunk_size: int = 1024, features: str | None = None):
    """`difflax encode`: a dataset of ENCODE_DATASETS and its flips into VAE latents in
    `out_dir` (`difflax.latents.encode_dataset`, resumable), with GMem snippets of an
    encoder of ENCODE_FEATURES if `features`. Returns (number of images, chunk paths)."""
    if dataset not in ENCODE_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} for encode; valid choices: "
                         f"{', '.join(ENCODE_DATASETS)}")
    if features is not None and features not in ENCODE_FEATURES:
        raise ValueError(f"unknown --features {features!r}; valid choices: "
                         f"{', '.join(ENCODE_FEATURES)}")
    images, labels = ENCODE_DATASETS[dataset](resolution, split)
    vae, variables = load_vae(vae_path)
    info = dict(dataset=dataset, split=split, resolution=images.shape[1],
                vae_path=os.path.abspath(vae_path))
    if features is not None:
        info["features"] = features
    feature_fn = None if features is None else ENCODE_FEATURES[features]()
    return len(images), encode_dataset(vae, variables, images, labels, out_dir,
                                       chunk_size=chunk_size, info=info, feature_fn=feature_fn)


def get_training_fns(config, model, *, batch_size: int, seed: int):
    """(make_batches(start_step), get_loss_fn(model) -> loss_fn(params, batch, key)) of a SiT
    run, for `difflax.training.train` (which gives get_loss_fn the SiT in
    `train.compute_dtype`): batches (z (B, h, h, C), labels (B,)[, snippets (B, D)][, REPA
    targets (B, D)]) depending only on (seed, step), and SiT's loss with the config's
    transport (plus `transport.repa_weight` times REPA's loss, aligned with the stored
    features, if > 0)."""
    d, tr = config.data, config.transport
    latents = load_latents(d.latents_dir)
    repa_weight = tr.get("repa_weight", 0.0)
    make_batches = lambda start: latent_batches(
        latents, batch_size, seed=seed, start_step=start, random_flip=d.random_flip,
        sample_posterior=d.sample_posterior, snippets=bool(model.config.snippet_dim),
        repa_targets=repa_weight > 0)
    get_loss_fn = lambda sit: get_interpolant_loss_fn(
        sit, interpolant=tr.interpolant, prediction=tr.prediction,
        loss_weight=tr.loss_weight or None, repa_weight=repa_weight)
    return make_batches, get_loss_fn


def get_decode_fn(latents_dir: str, vae_path: str | None = None):
    """decode(latents (B, h, h, C), scaled) -> images (B, H, W, c) in [-1, 1], jitted: the VAE
    of `vae_path` (default: the folder latents.json records), which must be the one the
    latents were encoded with; c = the encoded images' channels."""
    info = latents_info(latents_dir)
    path = vae_path or info.get("vae_path")
    if not path:
        raise ValueError(f"{latents_dir}/latents.json records no VAE folder; pass --vae FOLDER")
    vae, variables = load_vae(path)
    if vae.config != vae_config(info):
        raise ValueError(f"the VAE at {path} is not the one the latents of {latents_dir} were "
                         f"encoded with ({vae.config} != {vae_config(info)})")
    gray = info.get("image_channels", vae.config.out_channels) == 1

    @jax.jit
    def run(variables, latents):
        images = vae.apply(variables, latents, method="decode_latents")
        images = jnp.mean(images, -1, keepdims=True) if gray else images
        return jnp.clip(images, -1.0, 1.0)

    return lambda latents: run(variables, latents)


def load_bank(latents_dir: str) -> tuple[MemoryBank, np.ndarray]:
    """(GMem's memory bank, labels): one entry per stored image and flip (entry 2 i + f is
    image i, flip f), and the label of each entry's image."""
    snippets, labels = load_snippets(latents_dir)
    entries = snippets.reshape(-1, snippets.shape[-1])
    n = len(entries)
    bank = MemoryBank(entries=jnp.asarray(entries), frequencies=jnp.ones((n,), jnp.float32),
                      assignment=jnp.arange(n, dtype=jnp.int32))
    return bank, np.repeat(labels, 2)


def get_latent_sample_fn(model, config, *, method: str, steps: int,
                         vae_path: str | None = None):
    """sample(params, key, num, labels=None) -> (images (num, H, W, c) in [-1, 1], latents
    (num, h, h, C), labels (num,) or None).

    Noise from split(key)[0]. A SiT with snippets draws `num` bank entries from split(key)[1]
    (`sample.bank_sampling`) and returns their images' labels; a class-conditional one uses
    `labels` (default: i % num_classes, one class per grid column). SiT's ODE `method` with
    `steps` intervals, guidance `sample.cfg_scale`, the config's transport."""
    cfg, tr, s = model.config, config.transport, config.sample
    draw = get_draw_fn(model, interpolant=tr.interpolant, prediction=tr.prediction,
                       method=method, steps=steps, cfg_scale=s.cfg_scale, clip=False)
    decode = get_decode_fn(config.data.latents_dir, vae_path)
    bank, bank_labels = load_bank(config.data.latents_dir) if cfg.snippet_dim else (None, None)
    shape = (cfg.input_size, cfg.input_size, cfg.in_channels)

    def sample(params, key, num, labels=None):
        k_noise, k_cond = jax.random.split(key)
        noise = jax.random.normal(k_noise, (num, *shape))
        snippets = None
        if bank is not None:
            idx = sample_entries(bank, k_cond, num, by=s.bank_sampling)
            snippets, labels = bank.lookup(idx), bank_labels[np.asarray(idx)]
        elif not cfg.num_classes:
            labels = None
        elif labels is None:
            labels = np.arange(num) % cfg.num_classes
        latents = draw(params, noise, labels if cfg.num_classes else None, snippets)
        return decode(latents), latents, labels

    return sample


def labelled_latent_sample_fn(sample, params, num_classes: int):
    """A `get_latent_sample_fn` sampler as the metrics' SampleFn: (key, n) -> (images,
    labels), a class-conditional SiT's labels drawn uniformly from the key (as
    `difflax.workdir.labelled_sample_fn`), a GMem SiT's those of its snippets' images."""

    def sample_fn(key, batch_size):
        labels = jax.random.randint(jax.random.fold_in(key, 1), (batch_size,), 0,
                                    max(num_classes, 1))
        images, _, labels = sample(params, key, batch_size, labels)
        return images, labels

    return sample_fn


def evaluation_data(config, model, params):
    """(the dataset the latents were encoded from, its resolution, sample -> the metrics'
    SampleFn (`labelled_latent_sample_fn`)) of a SiT run, for `difflax evaluate`."""
    info = latents_info(config.data.latents_dir)
    return (info.get("dataset"), info["resolution"],
            lambda sample: labelled_latent_sample_fn(sample, params, model.config.num_classes))


def _sit_sample_fn(config, model, method, steps, vae):
    configs.parse_sampler(f"{method}:{steps}", "sit")
    sample = get_latent_sample_fn(model, config, method=method, steps=steps, vae_path=vae)
    return sample, steps * (2 if method == "heun" else 1)


def _sit_draw(model, sample, params, num, key):
    images, latents, labels = sample(params, key, num)
    return images, labels, {"latents": np.asarray(latents)}  # the latents (scaled) decoded


# a SiT / GMem run on latents, for the CLI (`difflax.workdir.RunKind`): classes in the grid's
# columns, or bank snippets in a square grid
SIT_RUN = RunKind(
    training_fns=lambda config, model, cfg: get_training_fns(
        config, model, batch_size=cfg.batch_size, seed=cfg.seed),
    default_sampler=lambda config: config.sample.method,
    sample_fn=_sit_sample_fn,
    draw=_sit_draw,
    grid_columns=lambda model: 0 if model.config.snippet_dim else model.config.num_classes,
    evaluation_data=evaluation_data)


def parse_classes(text: str | None, num: int | None = None) -> list[int]:
    """"207,360" -> [207, 360], repeated cyclically to `num` labels (default: as given);
    None -> SiT sample.py's eight classes (`difflax.pipelines.SIT_CLASSES`)."""
    from difflax.pipelines import SIT_CLASSES

    text = ",".join(map(str, SIT_CLASSES)) if text is None else text
    if not all(c.strip().isdigit() for c in text.split(",")):
        raise ValueError(f"--classes {text!r}: comma-separated integers >= 0, e.g. 207,360")
    classes = [int(c) for c in text.split(",")]
    return [classes[i % len(classes)] for i in range(num or len(classes))]


def sample_pretrained_sit(sit_path: str, vae_path: str | None, out: str, *, model: str,
                          image_size: int, fields: dict, classes: str | None, num: int | None,
                          cfg_scale: float, method: str, steps: int, seed: int,
                          dtype: str = "float32") -> dict:
    """`difflax sample --sit`: `SiTPipeline.from_pretrained(sit_path, vae_path, model=,
    image_size=, **fields).generate(..., dtype=)` of the labels `parse_classes(classes, num)`, written
    to out.png (a grid, one class per column) and out.npz (images (B, H, W, 3) in [-1, 1],
    the sampled latents (B, h, h, C) as SiT sees them, labels (B,)). Returns the table row."""
    from difflax.pipelines import SiTPipeline

    if not vae_path:
        raise ValueError("--sit needs --vae FOLDER: the diffusers AutoencoderKL folder of its "
                         "latent space (SiT-XL/2: stabilityai/sd-vae-ft-ema or -mse)")
    labels = parse_classes(classes, num)
    pipe = SiTPipeline.from_pretrained(sit_path, vae_path, model=model, image_size=image_size,
                                       **fields)
    tic = time.perf_counter()
    images, latents = pipe.generate(labels, cfg_scale=cfg_scale, method=method, steps=steps,
                                    seed=seed, dtype=dtype)
    seconds = time.perf_counter() - tic
    if jax.process_index() == 0:
        save_grid(out + ".png", images * 2 - 1, nrow=len(dict.fromkeys(labels)))
        np.savez(out + ".npz", images=images * 2 - 1, latents=latents, labels=np.array(labels))
    return {"sampler": method, "nfe": pipe.nfe(method, steps) or "adaptive",
            "cfg_scale": cfg_scale, "images": len(labels), "seconds": round(seconds, 1),
            "grid": out + ".png"}
