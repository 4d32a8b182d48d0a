"""A small AutoencoderKL trained on the digits and written as a diffusers folder: the VAE of the
SiT-on-latents experiments here (no pretrained VAE can be downloaded on this machine, and SD's
is 84M parameters for 8x8 digits).

    PYTHONPATH=. python experiments/digits_vae.py --out runs/digits_vae [--steps 1000]
        [--resolution 8] [--small]
    difflax encode --vae runs/digits_vae --data digits --resolution 8 --out runs/digits_vae_latents

The network is difflax's `AutoencoderKL` (diffusers' architecture) with a small `VAEConfig`:
one channel in and out, levels of 16 and 32 channels, one ResNet block each, 4 latent
channels: the 8x8 digits (their own size; 16x16 with --resolution 16) become 4x4x4 latents
(8x8x4, as the SD-VAE makes of 64x64 digits). On this shared 2-core CPU the 16x16 network
had not reached step 200 after 100 CPU-s, hence the 8x8 default.
Loss, per image (LDM, Rombach et al. 2022, Sec. 3 and App. G, without its perceptual and
adversarial terms): the squared error of the decoded posterior sample summed over pixels, plus
`--kl` times KL(q(z | x) || N(0, I)) summed over latent entries; each batch is flipped
horizontally at random (`difflax encode` stores every image and its flip). Adam, batch 32.
Afterwards `scaling_factor` is set to 1 / std of the posterior means over the data (LDM Sec.
4.3.2, where SD's 0.18215 comes from), and the folder (config.json +
diffusion_pytorch_model.safetensors, `difflax.models.save_vae`) is what `load_vae`, `difflax
encode` and diffusers read. Prints, and writes to OUT/report.json, the reconstruction error
and fd_digits of the reconstructions: the floor on which the decoded samples of any latent
model sit (the data's own fd_digits is 0: the reference statistics are of these digits).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from difflax import data, metrics
from difflax.models import AutoencoderKL, VAEConfig, save_vae
from difflax.models.vae import init_vae

CONFIG = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                   latent_channels=4, norm_num_groups=8, scaling_factor=1.0)
SMALL_CONFIG = dataclasses.replace(CONFIG, block_out_channels=(8, 16), norm_num_groups=4)


def vae_loss(vae, params, images, key, kl_weight):
    """Mean over the batch of sum (x - decode(z))^2 + kl_weight KL(N(mean, exp logvar) || N(0, I)),
    z a posterior sample; also returns the mean squared error per pixel."""
    mean, logvar = vae.apply(params, images, method="encode")
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    err = (vae.apply(params, z, method="decode") - images) ** 2
    kl = 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    return jnp.mean(jnp.sum(err, axis=(1, 2, 3)) + kl_weight * kl), jnp.mean(err)


def train_vae(config, images, *, steps, batch_size=32, lr=1e-3, kl_weight=1e-3, seed=0):
    """Adam on `vae_loss` over random batches of `images` (flipped at random); returns the
    variables."""
    vae, tx = AutoencoderKL(config), optax.adam(lr)
    params = init_vae(config, jax.random.key(seed), images.shape[1])
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch, key):
        (loss, mse), grads = jax.value_and_grad(
            lambda p: vae_loss(vae, p, batch, key, kl_weight), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, mse

    rng, tic = np.random.default_rng(seed), time.perf_counter()
    for i in range(1, steps + 1):
        idx = rng.integers(0, len(images), batch_size)
        flip = rng.random(batch_size) < 0.5
        batch = np.where(flip[:, None, None, None], images[idx, :, ::-1], images[idx])
        params, opt_state, loss, mse = step(params, opt_state, batch, jax.random.key(i))
        if i % max(steps // 10, 1) == 0 or i == steps:
            print(f"step {i}: loss {float(loss):.2f}, mse {float(mse):.4f} "
                  f"({time.perf_counter() - tic:.0f} s)", flush=True)
    return params


def reconstruction_report(config, params, images, labels):
    """(config with scaling_factor = 1 / std of the posterior means, report dict): per-pixel
    MSE of decode(mean), and fd_digits of the reconstructions (the reference statistics are
    those of these digits, whose own fd_digits is 0)."""
    vae = AutoencoderKL(config)
    encode = jax.jit(lambda x: vae.apply(params, x, method="encode")[0])
    decode = jax.jit(lambda z: vae.apply(params, z, method="decode"))
    means = np.concatenate([encode(images[i:i + 256]) for i in range(0, len(images), 256)])
    recon = np.concatenate([decode(means[i:i + 256]) for i in range(0, len(means), 256)])
    config = dataclasses.replace(config, scaling_factor=float(1.0 / means.std()))
    n, r = len(images), images.shape[1]
    score = lambda x: metrics.evaluate_digits(
        lambda key, b: (jnp.asarray(x[:b]), jnp.asarray(labels[:b])), key=jax.random.key(0),
        num_samples=n, batch_size=n, resolution=r, progress=False, bootstrap=0)["fd_digits"]
    return config, dict(mse=float(np.mean((np.clip(recon, -1, 1) - images) ** 2)),
                        latent_std=float(means.std()), scaling_factor=config.scaling_factor,
                        fd_digits_reconstructions=score(np.clip(recon, -1, 1)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/digits_vae", help="the diffusers folder to write")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--resolution", type=int, default=8, help="digits size: 8 (their own) or 16")
    p.add_argument("--kl", type=float, default=1e-3, help="weight of the KL term")
    p.add_argument("--small", action="store_true", help="a tiny network, 20 steps: a check")
    args = p.parse_args()
    config, steps = (SMALL_CONFIG, 20) if args.small else (CONFIG, args.steps)
    images, labels = data.load_digits(args.resolution)
    tic = time.perf_counter()
    params = train_vae(config, images, steps=steps, kl_weight=args.kl)
    config, report = reconstruction_report(config, params, images, labels)
    report.update(steps=steps, kl_weight=args.kl, seconds=round(time.perf_counter() - tic, 1),
                  config=dataclasses.asdict(config))
    save_vae(args.out, config, params)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
