"""Latent datasets: images encoded once by Stable Diffusion's autoencoder, stored with their
horizontal flips, and batches of latents for training latent diffusion models (SiT, GMem).

    out_dir/
      latents.json          what is stored (count, chunk size, latent shape, VAE config, source)
      chunk_00000.npz       mean, logvar (n, 2, h, w, C): the VAE posterior of each image
      chunk_00001.npz       (index 0) and of its horizontal flip (index 1); labels (n,)
      ...

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

from difflax.chunks import chunk_path, open_chunks, read_chunks, write_chunk
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


def encode_dataset(vae: AutoencoderKL, variables, images: np.ndarray, labels: np.ndarray,
                   out_dir: str, *, chunk_size: int = 1024, info: dict | None = None,
                   progress: bool = True) -> list[str]:
    """Encodes `images` (N, H, W, C) float32 in [-1, 1] and their horizontal flips into
    `out_dir` (layout in the module docstring), resuming from the chunks already there;
    returns the chunk paths. `info` (dataset name, VAE path, ...) is recorded in
    latents.json; resuming with a different description is an error."""
    encode = get_encode_fn(vae)
    h = images.shape[1] // 2 ** (len(vae.config.block_out_channels) - 1)
    meta = dict(num_images=int(images.shape[0]), chunk_size=chunk_size,
                latent_shape=[h, h, vae.config.latent_channels],
                vae=dataclasses.asdict(vae.config), **(info or {}))
    num_chunks = -(-images.shape[0] // chunk_size)
    todo = open_chunks(out_dir, "latents", meta, num_chunks)
    quiet = not (progress and jax.process_index() == 0)
    for i in tqdm(todo, unit="chunk", desc="encoding", disable=quiet):
        rows = slice(i * chunk_size, (i + 1) * chunk_size)
        x = images[rows]
        n = x.shape[0]  # the last chunk is padded to the same shape: one compilation
        mean, logvar = encode(variables, np.pad(x, ((0, chunk_size - n),) + ((0, 0),) * 3))
        write_chunk(out_dir, i, mean=mean[:n], logvar=logvar[:n],
                    labels=np.asarray(labels[rows], np.int32))
    return [chunk_path(out_dir, i) for i in range(num_chunks)]


def load_latents(out_dir: str) -> dict:
    """All stored latents of `out_dir`: {"mean", "logvar" (N, 2, h, w, C), "labels" (N,),
    "config" (the VAEConfig they were encoded with)}; every chunk must be present."""
    meta, arrays = read_chunks(out_dir, "latents", "num_images", ("mean", "logvar", "labels"),
                               "`difflax encode` (difflax.latents.encode_dataset)")
    vae = {**meta["vae"], "block_out_channels": tuple(meta["vae"]["block_out_channels"])}
    return {**arrays, "config": VAEConfig(**vae)}


def latent_batches(latents: dict, batch_size: int, *, seed: int = 0, start_step: int = 0,
                   random_flip: bool = True, sample_posterior: bool = True,
                   process_index: int | None = None, process_count: int | None = None):
    """Infinite iterator of this process's rows of (latents (B, h, w, C), labels (B,)) batches,
    latents scaled for the diffusion model (`difflax.models.vae.scale_latents`).

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
        yield np.asarray(z, np.float32), latents["labels"][idx]
