"""SiT (Ma et al., ECCV 2024) class label -> image, from a willisma/SiT checkpoint and a local
diffusers AutoencoderKL folder (SD-VAE), as SiT's `sample.py`:

    class labels y (B,) -> N(0, I) latents (B, h, h, C), image i from fold_in(key(seed), i)
    -> SiT's probability-flow ODE (SiT Sec. 3; linear interpolant, velocity prediction:
    `difflax.interpolants.sample_ode`, default adaptive dopri5 with atol 1e-6, rtol 1e-3,
    SiT's ODE defaults) with classifier-free guidance on the first three latent channels
    (SiT's `forward_with_cfg`, `difflax.interpolants.get_sit_fn`) -> the VAE decoder of the
    unscaled latents (`AutoencoderKL.decode_latents`, the one place where the VAE's scaling
    factor, SD 0.18215, is undone) -> images in [0, 1]

`difflax sample --sit SiT-XL-2-256x256.pt --vae sd-vae-ft-ema --out grid.png` is this
pipeline from the command line. Sampling is one `jax.jit` per (method, steps, guidance
scale), traced once per batch shape; the batch is split over a 1-D device mesh
(difflax.mesh; padded to a multiple of the device count) and the parameters are replicated
once at load time. Adaptive dopri5 takes one step size for the whole batch, so its samples
depend (within its tolerance) on what else is in the batch; the grid methods do not.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from difflax.interpolants import ODE_METHODS, check_choice, get_sit_fn, sample_ode
from difflax.mesh import batch_sharded, host_to_global, make_mesh, pad_to_mesh, replicated
from difflax.models.sit import SiT, sit_config
from difflax.models.sit_weights import load_sit
from difflax.models.vae import load_vae
from difflax.pipelines.stable_diffusion import DTYPES

# willisma/SiT sample.py's class labels (ImageNet: loggerhead turtle, husky, ...)
SIT_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)


class SiTPipeline:
    """A SiT and the VAE of its latent space on a device mesh (default: all devices);
    `generate` keeps one compiled sampler per (method, steps, cfg_scale)."""

    def __init__(self, sit: SiT, sit_vars, vae, vae_vars, *, mesh=None):
        channels, latent = sit.config.in_channels, vae.config.latent_channels
        if channels != latent:
            raise ValueError(f"the SiT takes {channels}-channel latents, the VAE makes {latent}"
                             "-channel ones: they are not of the same latent space")
        self.mesh = make_mesh() if mesh is None else mesh
        self.sit, self.sit_vars = sit, host_to_global(sit_vars, replicated(self.mesh))
        self.vae, self.vae_vars = vae, host_to_global(vae_vars, replicated(self.mesh))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._compiled = {}

    @classmethod
    def from_pretrained(cls, sit_path: str | os.PathLike, vae_path: str | os.PathLike, *,
                        model: str | None = "SiT-XL/2", image_size: int = 256, mesh=None,
                        **fields) -> "SiTPipeline":
        """Loads SiT weights (`load_sit`: a willisma/SiT `.pt`, e.g. SiT-XL-2-256x256.pt, or
        an `.npz`) and a diffusers AutoencoderKL folder (`load_vae`).

        model: a SiT preset (`difflax.models.sit.PRESETS`; 1000 classes), its latent size
        image_size / the VAE's down-sampling factor (SiT's `--image-size`: 256 -> 32 with
        SD-VAE) and its channels the VAE's; None takes an `.npz`'s stored config. fields:
        SiTConfig fields over those (e.g. num_classes=10, depth=2).
        """
        vae, vae_vars = load_vae(vae_path)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if image_size < factor or image_size % factor:
            raise ValueError(f"image size {image_size} must be a positive multiple of the "
                             f"VAE's down-sampling factor {factor}")
        if model is None:  # the .npz's stored config, `fields` overriding it
            sit, sit_vars = load_sit(sit_path, None, **fields)
        else:
            fields = {"input_size": image_size // factor,
                      "in_channels": vae.config.latent_channels, **fields}
            sit, sit_vars = load_sit(sit_path, sit_config(model, **fields))
        return cls(sit, sit_vars, vae, vae_vars, mesh=mesh)

    def nfe(self, method: str = "dopri5", steps: int = 50) -> int | None:
        """SiT evaluations per image on the grid methods (each evaluates both guidance
        branches at once); None for the adaptive ones."""
        check_choice("method", method, ODE_METHODS)
        return {"euler": steps, "heun": 2 * steps}.get(method)

    def initial_latents(self, seed: int, batch: int) -> np.ndarray:
        """Standard normal latents (batch, h, h, C), image i drawn from fold_in(key(seed), i):
        the same for any batch size and device count."""
        c = self.sit.config
        key = jax.random.key(seed)
        draw = lambda i: jax.random.normal(jax.random.fold_in(key, i),
                                           (c.input_size, c.input_size, c.in_channels))
        return np.asarray(jax.vmap(draw)(jnp.arange(batch)))

    def generate(self, classes=SIT_CLASSES, *, cfg_scale: float = 4.0, method: str = "dopri5",
                 steps: int = 50, seed: int = 0, latents=None,
                 dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
        """(images (B, H, W, 3) in [0, 1], sampled latents (B, h, h, C), scaled as SiT sees
        them) of the class labels `classes` (B ints in [0, num_classes)).

        cfg_scale: SiT's guidance on the first three channels (1: none; > 1 needs the null
        label of class_dropout_prob > 0). method: euler or heun on `steps` uniform intervals
        (`sample_ode`), or adaptive dopri5 / tsit5 (SiT's default; `steps` unused). latents:
        the initial noise (B, h, h, C), else `initial_latents(seed, B)`. dtype: "float32" or
        "bfloat16": the SiT (`SiT.dtype`: its blocks in bfloat16, its output float32) and the
        VAE decoder (its float32 parameters cast inside the compiled function) compute in it;
        the ODE's state stays float32.
        """
        check_choice("method", method, ODE_METHODS)
        check_choice("dtype", dtype, tuple(DTYPES))
        classes = np.asarray(classes, np.int32).reshape(-1)
        num = self.sit.config.num_classes
        if not len(classes) or classes.min() < 0 or classes.max() >= num:
            raise ValueError(f"classes {classes.tolist()}: give one or more labels in "
                             f"[0, {num - 1}] (this SiT's num_classes is {num})")
        if cfg_scale != 1.0 and not self.sit.config.class_dropout_prob:
            raise ValueError(f"cfg_scale {cfg_scale} needs a null label, which this SiT has "
                             "not (class_dropout_prob = 0); use cfg_scale 1")
        if latents is None:
            latents = self.initial_latents(seed, len(classes))
        latents = np.asarray(latents, np.float32)
        if latents.shape[0] != len(classes):
            raise ValueError(f"latents have batch size {latents.shape[0]}; classes "
                             f"{len(classes)}")
        key = (method, steps, float(cfg_scale), dtype)
        if key not in self._compiled:
            self._compiled[key] = self._sampling_fn(*key)
        padded = pad_to_mesh((latents, classes), self.mesh)
        noise, y = host_to_global(padded, batch_sharded(self.mesh))
        images, z = self._compiled[key](self.sit_vars, self.vae_vars, noise, y)
        return np.asarray(images)[:len(classes)], np.asarray(z)[:len(classes)]

    def _sampling_fn(self, method, steps, cfg_scale, dtype):
        """jit of (sit_vars, vae_vars, noise, y) -> (images in [0, 1], latents) on the mesh."""
        sit = self.sit.clone(dtype=dtype)

        def run(sit_vars, vae_vars, noise, y):
            sit_fn = get_sit_fn(sit, sit_vars, y=y, cfg_scale=cfg_scale)
            z, _ = sample_ode(sit_fn, noise, method=method, steps=steps)
            vae_vars = jax.tree.map(lambda a: a.astype(dtype), vae_vars)
            images = self.vae.apply(vae_vars, z.astype(dtype), method="decode_latents")
            return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0), z

        repl, split = replicated(self.mesh), batch_sharded(self.mesh)
        return jax.jit(run, in_shardings=(repl, repl, split, split), out_shardings=repl)
