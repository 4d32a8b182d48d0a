"""Stable Diffusion (Rombach et al. 2022) text -> image over difflax's models and samplers,
from a local diffusers pipeline folder (unet/, text_encoder/, tokenizer/, vae/, scheduler/).

    prompts -> CLIP tokenizer -> text encoder -> (B, 77, D) conditioning (and "" for the
    unconditional branch) -> classifier-free guidance (Ho & Salimans 2022, eq. 6) on the
    UNet's prediction, eps_u + w (eps_c - eps_u), both branches in one UNet call -> a difflax
    sampler on SD's discrete VP schedule over diffusers' timesteps -> VAE decoder -> [0, 1]

Timesteps follow diffusers' DDIMScheduler on the folder's scheduler_config.json (SD:
num_train_timesteps 1000, scaled-linear betas 0.00085..0.012, "leading" spacing,
steps_offset 1, set_alpha_to_one False): t_i = i * (1000 // steps) + steps_offset, i = steps-1
.. 0, and the last step ends at t = 0 (alpha_bar_0 = 1 - beta_0, not 1). With sampler="ddim"
(Song et al. 2021 eq. 12, eta = 0) the images equal diffusers' StableDiffusionPipeline with
that DDIMScheduler; other difflax samplers run on the same grid.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from difflax import schedules as sch
from difflax.models.clip import load_clip_text_encoder
from difflax.models.clip_tokenizer import load_clip_tokenizer
from difflax.models.diffusers_weights import read_json
from difflax.models.sd_unet_weights import load_sd_unet
from difflax.models.vae import load_vae
from difflax.samplers import sample

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SPACINGS = ("leading", "trailing")
BETA_SCHEDULES = ("scaled_linear", "linear")


@dataclasses.dataclass(frozen=True)
class SDScheduler:
    """The fields of a diffusers scheduler_config.json that fix SD's noise schedule and
    timesteps (defaults: Stable Diffusion 1.x)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1

    def schedule(self) -> sch.VPDiscrete:
        """SD's discrete VP schedule; time is the UNet's timestep in [0, N - 1]."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = sch.ddpm_betas(n, self.beta_start, self.beta_end)
        else:
            betas = sch.scaled_linear_betas(n, self.beta_start, self.beta_end)
        return sch.vp_discrete(betas)

    def grid(self, steps: int) -> np.ndarray:
        """diffusers DDIMScheduler's timesteps for `steps` steps, then 0 (where
        set_alpha_to_one=False ends): a decreasing grid of schedule times."""
        n = self.num_train_timesteps
        if self.timestep_spacing == "leading":
            ts = np.arange(steps)[::-1] * (n // steps) + self.steps_offset
        else:
            ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        # DDIM steps from t to t - n // steps: a grid only if that is the next timestep
        if len(ts) > 1 and np.any(np.diff(ts) != -(n // steps)):
            raise ValueError(f"{self.timestep_spacing!r} spacing with {steps} steps has uneven "
                             f"timesteps {ts.tolist()}; use steps dividing {n}")
        return np.append(ts, 0.0) if ts[-1] > 0 else ts.astype(np.float64)


def scheduler_from_diffusers(config: dict) -> SDScheduler:
    """A diffusers scheduler_config.json (DDIM, PNDM, ... of an SD checkpoint) -> SDScheduler;
    values this pipeline does not reproduce raise an error naming the supported ones."""
    supported = {"beta_schedule": BETA_SCHEDULES, "prediction_type": tuple(PREDICTION_TYPES),
                 "timestep_spacing": SPACINGS, "set_alpha_to_one": (False,),
                 "clip_sample": (False,), "thresholding": (False,),
                 "rescale_betas_zero_snr": (False,), "trained_betas": (None,)}
    for key, valid in supported.items():
        if key in config and config[key] not in valid:
            raise ValueError(f"unsupported scheduler {key}={config[key]!r}; supported: "
                             f"{list(valid)}")
    fields = {f.name: config[f.name] for f in dataclasses.fields(SDScheduler) if f.name in config}
    return SDScheduler(**fields)


class StableDiffusion:
    """Loaded SD components: modules, their variables, tokenizer and scheduler settings.
    Compiled samplers are cached per (batch shape, steps, sampler, guidance on/off)."""

    def __init__(self, unet, unet_vars, text, text_vars, tokenizer, vae, vae_vars, scheduler):
        self.unet, self.unet_vars = unet, unet_vars
        self.text, self.text_vars = text, text_vars
        self.tokenizer, self.vae, self.vae_vars = tokenizer, vae, vae_vars
        self.scheduler = scheduler
        self.schedule = scheduler.schedule()
        self.prediction = PREDICTION_TYPES[scheduler.prediction_type]
        self._compiled = {}

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "StableDiffusion":
        """Loads a local diffusers Stable Diffusion folder (`save_pretrained` layout: unet/,
        text_encoder/, tokenizer/, vae/, and scheduler/scheduler_config.json, whose absence
        means SD 1.x's settings)."""
        folder = os.fspath(folder)
        scheduler = scheduler_from_diffusers(
            read_json(os.path.join(folder, "scheduler", "scheduler_config.json")))
        return cls(*load_sd_unet(os.path.join(folder, "unet")),
                   *load_clip_text_encoder(os.path.join(folder, "text_encoder")),
                   load_clip_tokenizer(os.path.join(folder, "tokenizer")),
                   *load_vae(os.path.join(folder, "vae")), scheduler)

    def encode_prompts(self, prompts) -> jax.Array:
        """prompts (str or list of B str) -> the text encoder's last hidden state (B, L, D)."""
        return self.text.apply(self.text_vars, self.tokenizer(prompts))

    def generate(self, prompts=None, *, prompt_embeds=None, negative_prompt_embeds=None,
                 latents=None, steps: int = 50, sampler: str = "ddim",
                 guidance_scale: float = 7.5, seed: int = 0) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1] for `prompts` (or their `prompt_embeds` (B, L, D)).

        negative_prompt_embeds: the unconditional branch's conditioning (default: the empty
        prompt's); guidance applies when guidance_scale > 1, as in diffusers. latents: the
        initial latents x_T (B, h, w, C) (diffusers' `latents`, NHWC), else standard normal
        from `seed` at the UNet's sample_size.
        """
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompts or prompt_embeds")
        cond = self.encode_prompts(prompts) if prompt_embeds is None else jnp.asarray(prompt_embeds)
        guided = guidance_scale > 1.0
        if guided:
            uncond = (self.encode_prompts([""] * cond.shape[0]) if negative_prompt_embeds is None
                      else jnp.asarray(negative_prompt_embeds))
            cond = jnp.concatenate([uncond, cond])
        if latents is None:
            size, ch = self.unet.config.sample_size, self.unet.config.in_channels
            latents = jax.random.normal(jax.random.key(seed), (cond.shape[0] // (1 + guided),
                                                               size, size, ch))
        key = (jnp.shape(latents), steps, sampler, guided)
        if key not in self._compiled:
            self._compiled[key] = self._sampling_fn(steps, sampler, guided)
        images = self._compiled[key](self.unet_vars, self.vae_vars, jnp.asarray(latents), cond,
                                     jnp.float32(guidance_scale))
        return np.asarray(images)

    def _sampling_fn(self, steps, sampler, guided):
        grid = self.scheduler.grid(steps)
        sigma_start = float(self.schedule.sigma(grid[0]))

        def run(unet_vars, vae_vars, x_T, context, scale):
            def model_fn(x, t):
                if not guided:
                    return self.unet.apply(unet_vars, x, t, context)
                out = self.unet.apply(unet_vars, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                                      context)
                uncond, cond = jnp.split(out, 2)
                return uncond + scale * (cond - uncond)

            # sample starts from sigma(T) * noise; diffusers from x_T itself
            z, _ = sample(model_fn, x_T / sigma_start, schedule=self.schedule, sampler=sampler,
                          grid=grid, prediction=self.prediction)
            images = self.vae.apply(vae_vars, z, method="decode_latents")
            return jnp.clip(images / 2 + 0.5, 0.0, 1.0)

        return jax.jit(run)
