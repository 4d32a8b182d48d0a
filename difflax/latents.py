"""Latent datasets: images encoded once by Stable Diffusion's autoencoder, stored with their
horizontal flips, and batches of latents for training latent diffusion models (SiT, GMem).

    out_dir/
      latents.json          what is stored (count, chunk size, latent shape, VAE config, source)
      chunk_00000.npz       mean, logvar (n, 2, h, w, C): the VAE posterior of each image
      chunk_00001.npz       (index 0) and of its horizontal flip (index 1); labels (n,);
      ...                   optionally features (n, 2, D): GMem's memory snippets, the
                            L2-normalised image-encoder features of the image and its flip

As REPA's preprocessing does, the posterior moments are stored rather than one sample, so
each training step draws a fresh z = mean + exp(logvar / 2) eps; the flip is stored beside the
image (one encoder pass per flip instead of one per epoch) and chosen per example at training
time. Chunk i holds images [i * chunk_size, (i + 1) * chunk_size), written through
`difflax.chunks`, so a killed run started again finishes with the same files. The encoder
batch is sharded over the device mesh; on several processes, process 0 writes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from difflax.chunks import chunk_path, open_chunks, read_chunks, read_meta, write_chunk
from difflax.data import index_batches, local_rows
from difflax.models.vae import AutoencoderKL, VAEConfig, scale_latents
from difflax.mesh import batch_sharded, make_mesh, pad_to_mesh, replicated


def get_encode_fn(vae: AutoencoderKL):
    """fn(variables, images (B, H, W, C) in [-1, 1]) -> (mean, logvar), each (B, 2, h, w, C'):
    the posterior of each image and of its horizontal flip, with the batch sharded over the
    mesh. Images with one channel are repeated to the VAE's `in_channels` (digits, MNIST)."""
    mesh = make_mesh()

    def encode(variables, images):
        both = jnp.concatenate([images, images[:, :, ::-1]])
        mean, logvar = vae.apply(variables, both, method="encode")
        split = lambda a: a.reshape(2, images.shape[0], *a.shape[1:]).swapaxes(0, 1)
        return split(mean), split(logvar)

    run = jax.jit(encode, in_shardings=(replicated(mesh), batch_sharded(mesh)))

    def fn(variables, images):
        if images.shape[-1] == 1 and vae.config.in_channels != 1:
            images = np.repeat(images, vae.config.in_channels, axis=-1)
        n = images.shape[0]
        (images,) = pad_to_mesh((images,), mesh)
        return tuple(np.asarray(a)[:n] for a in run(variables, images))

    return fn


def snippets_of_both(feature_fn, images: np.ndarray) -> np.ndarray:
    """feature_fn(images) (B, D) of images (B, H, W, C) and of their horizontal flips:
    (B, 2, D) float32."""
    return np.stack([np.asarray(feature_fn(x), np.float32) for x in (images, images[:, :, ::-1])],
                    axis=1)


def encode_dataset(vae: AutoencoderKL, variables, images: np.ndarray, labels: np.ndarray,
                   out_dir: str, *, chunk_size: int = 1024, info: dict | None = None,
                   feature_fn=None, progress: bool = True) -> list[str]:
    """Encodes `images` (N, H, W, C) float32 in [-1, 1] and their horizontal flips into
    `out_dir` (layout in the module docstring), resuming from the chunks already there;
    returns the chunk paths. `info` (dataset name, VAE path, ...) is recorded in
    latents.json; resuming with a different description is an error. With `feature_fn`
    (images (B, H, W, C) -> (B, D) memory snippets, e.g. the L2-normalised
    `difflax.gmem.digits_snippet_encoder()` features, GMem Sec. 3), each chunk also stores the
    snippets of both flips (`snippets_of_both`); latents.json records D as `feature_dim`."""
    encode = get_encode_fn(vae)
    h = images.shape[1] // 2 ** (len(vae.config.block_out_channels) - 1)
    meta = dict(num_images=int(images.shape[0]), chunk_size=chunk_size,
                latent_shape=[h, h, vae.config.latent_channels],
                image_channels=int(images.shape[-1]), num_classes=int(labels.max()) + 1,
                vae=dataclasses.asdict(vae.config),
                **(info or {}))
    if feature_fn is not None:
        meta["feature_dim"] = int(snippets_of_both(feature_fn, images[:1]).shape[-1])
    num_chunks = -(-images.shape[0] // chunk_size)
    todo = open_chunks(out_dir, "latents", meta, num_chunks)
    quiet = not (progress and jax.process_index() == 0)
    for i in tqdm(todo, unit="chunk", desc="encoding", disable=quiet):
        rows = slice(i * chunk_size, (i + 1) * chunk_size)
        x = images[rows]
        n = x.shape[0]  # the last chunk is padded to the same shape: one compilation
        mean, logvar = encode(variables, np.pad(x, ((0, chunk_size - n),) + ((0, 0),) * 3))
        extra = {} if feature_fn is None else {"features": snippets_of_both(feature_fn, x)}
        write_chunk(out_dir, i, mean=mean[:n], logvar=logvar[:n],
                    labels=np.asarray(labels[rows], np.int32), **extra)
    return [chunk_path(out_dir, i) for i in range(num_chunks)]


HOW_TO_ENCODE = "`difflax encode` (difflax.latents.encode_dataset)"


def latents_info(out_dir: str) -> dict:
    """The description latents.json holds (num_images, latent_shape, num_classes, vae,
    vae_path, feature_dim if snippets are stored, ...), without reading the chunks."""
    return read_meta(out_dir, "latents", HOW_TO_ENCODE)


def vae_config(info: dict) -> VAEConfig:
    """The VAEConfig recorded in a latents.json description (`latents_info`)."""
    return VAEConfig(**{**info["vae"], "block_out_channels": tuple(info["vae"]["block_out_channels"])})


def load_snippets(out_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """(snippets (N, 2, D), labels (N,)): the stored GMem snippets of every image and flip,
    without the latents."""
    _, arrays = read_chunks(out_dir, "latents", "num_images", ("features", "labels"),
                            HOW_TO_ENCODE + " with --features")
    return arrays["features"], arrays["labels"]


def load_latents(out_dir: str) -> dict:
    """All stored latents of `out_dir`: {"mean", "logvar" (N, 2, h, w, C), "labels" (N,),
    "config" (the VAEConfig they were encoded with)}, and "features" (N, 2, D) if snippets
    were stored; every chunk must be present."""
    keys = ("mean", "logvar", "labels") + (("features",) if "feature_dim" in latents_info(out_dir)
                                           else ())
    meta, arrays = read_chunks(out_dir, "latents", "num_images", keys, HOW_TO_ENCODE)
    return {**arrays, "config": vae_config(meta)}


def latent_batches(latents: dict, batch_size: int, *, seed: int = 0, start_step: int = 0,
                   random_flip: bool = True, sample_posterior: bool = True,
                   snippets: bool = False, repa_targets: bool = False,
                   process_index: int | None = None, process_count: int | None = None):
    """Infinite iterator of this process's rows of (latents (B, h, w, C), labels (B,)) batches,
    latents scaled for the diffusion model (`difflax.models.vae.scale_latents`); with
    `snippets`, (latents, labels, snippets (B, D)): each example's stored GMem snippet, of the
    same flip as its latent (the batches `get_interpolant_loss_fn` reads); with
    `repa_targets`, the same stored features once more, last, as REPA's targets (B, D) (pooled:
    the stored encoder features stand in for REPA's per-token ones).

    The examples of batch i follow `difflax.data.index_batches`; the flip (probability 1/2 if
    `random_flip`, else never) and the posterior noise (if `sample_posterior`, else the mean)
    come from numpy's generator seeded with (seed, i, 2) over the global batch, so batch i
    depends only on (seed, i) and `start_step` resumes a run exactly.
    """
    config, (_, _, *shape) = latents["config"], latents["mean"].shape
    rows = local_rows(batch_size, process_index, process_count)
    batches = index_batches(len(latents["labels"]), batch_size, seed=seed, start_step=start_step,
                            process_index=process_index, process_count=process_count)
    for step, idx in enumerate(batches, start_step):
        rng = np.random.default_rng([seed, step, 2])
        flip = (rng.random(batch_size) < 0.5).astype(int)[rows] if random_flip else 0
        noise = rng.standard_normal((batch_size, *shape), np.float32)[rows]
        mean, logvar = latents["mean"][idx, flip], latents["logvar"][idx, flip]
        z = scale_latents(config, mean, logvar, noise if sample_posterior else None)
        batch = (np.asarray(z, np.float32), latents["labels"][idx])
        features = latents["features"][idx, flip] if snippets or repa_targets else None
        yield batch + (features,) * (int(snippets) + int(repa_targets))
