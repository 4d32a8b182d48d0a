"""Stable Diffusion (Rombach et al. 2022) text -> image over difflax's models and samplers,
from a local diffusers pipeline folder (unet/, text_encoder/, tokenizer/, vae/, scheduler/).

    prompts -> CLIP tokenizer -> text encoder -> (B, 77, D) conditioning (and the negative
    prompt's, default "", for the unconditional branch) -> classifier-free guidance (Ho &
    Salimans 2022, eq. 6) on the UNet's prediction, eps_u + w (eps_c - eps_u), both branches
    in one (vmapped) UNet call -> a difflax sampler on SD's discrete VP schedule -> VAE
    decoder -> images in [0, 1]

Time grids: each sampler runs on the timesteps of the diffusers scheduler that implements it,
for the folder's scheduler_config.json (SD 1.5: num_train_timesteps 1000, scaled-linear betas
0.00085..0.012, steps_offset 1, set_alpha_to_one False, no timestep_spacing):

- dpmpp_2m, dpmpp_3m, dpm_multistep and unipc: those of DPMSolverMultistepScheduler /
  UniPCMultistepScheduler `from_config` of that file, then sigma = 0 (final_sigmas_type
  "zero"; schedule time -1, `VPDiscrete.t_zero`). Their spacing is the file's
  timestep_spacing, else their default "linspace" (SD 1.5's file has none): t_i =
  round(999 i / steps), i = steps .. 1 (4 steps: 999, 749, 500, 250); "leading":
  t_i = i * (1000 // (steps + 1)) + steps_offset.
- every other sampler (ddim, deis_*, ipndm, euler, ...): DDIMScheduler's (default "leading"),
  t_i = i * (1000 // steps) + steps_offset, i = steps - 1 .. 0, then t = 0 (alpha_bar_0 =
  1 - beta_0, not 1).

With ddim (Song et al. 2021 eq. 12, eta = 0), dpmpp_2m and unipc the images equal diffusers'
StableDiffusionPipeline with DDIMScheduler, DPMSolverMultistepScheduler and
UniPCMultistepScheduler (tests/test_sd_pipeline.py).

Sampling is one `jax.jit` per (steps, sampler, guidance on/off, dtype, feature plan), traced
once per batch shape and reused for other prompts, seeds, guidance scales and skip scales.
The model is `difflax.models.sd_unet.sd_run_fn` (guidance, the feature cache of a plan) under
the sampler of `difflax.samplers.get_sample_fn`. The batch is split over a 1-D device mesh
(difflax.mesh; padded to a multiple of the device count), the parameters are replicated once
at load time, and the images come back replicated. With
dtype="bfloat16" the UNet and VAE decoder compute in bfloat16 (their float32 parameters are
cast inside the compiled function); the text encoder, the sampler's state and the guidance
combination stay float32.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from difflax import schedules as sch
from difflax.models.clip import load_clip_text_encoder
from difflax.models.clip_tokenizer import load_clip_tokenizer
from difflax.models.diffusers_weights import read_json
from difflax.models.sd_unet import sd_run_fn
from difflax.models.sd_unet_weights import load_sd_unet
from difflax.models.vae import load_vae
from difflax.samplers import SAMPLERS, get_sample_fn, make_solver
from difflax.mesh import batch_sharded, host_to_global, make_mesh, pad_to_mesh, replicated

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("scaled_linear", "linear")
# samplers diffusers runs with DPMSolverMultistepScheduler / UniPCMultistepScheduler, whose
# timesteps (and final sigma = 0) they use here; all others use DDIMScheduler's
MULTISTEP_SAMPLERS = ("dpm_multistep", "dpmpp_2m", "dpmpp_3m", "unipc")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class SDScheduler:
    """The fields of a diffusers scheduler_config.json that fix SD's noise schedule and
    timesteps (defaults: Stable Diffusion 1.x)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None  # None: the scheduler class's default, as from_config
    steps_offset: int = 1

    def schedule(self) -> sch.VPDiscrete:
        """SD's discrete VP schedule; time is the UNet's timestep in [0, N - 1]."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = sch.ddpm_betas(n, self.beta_start, self.beta_end)
        else:
            betas = sch.scaled_linear_betas(n, self.beta_start, self.beta_end)
        return sch.vp_discrete(betas, with_t_zero=True)

    def grid(self, steps: int, sampler: str = "ddim") -> np.ndarray:
        """The decreasing grid of schedule times `sampler` runs on: `multistep_grid` for
        MULTISTEP_SAMPLERS, else `ddim_grid`."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if sampler in MULTISTEP_SAMPLERS:
            return self.multistep_grid(steps)
        return self.ddim_grid(steps, sampler)

    def multistep_grid(self, steps: int) -> np.ndarray:
        """diffusers DPMSolverMultistepScheduler's (= UniPCMultistepScheduler's) timesteps for
        `steps` steps, then -1 (sigma = 0, final_sigmas_type "zero"). Their default spacing,
        used when the config has none (SD 1.x's), is "linspace"."""
        n, spacing = self.num_train_timesteps, self.timestep_spacing or "linspace"
        if spacing == "leading":
            ts = np.arange(steps + 1)[::-1][:-1] * (n // (steps + 1)) + self.steps_offset
        elif spacing == "linspace":
            ts = np.round(np.linspace(0, n - 1, steps + 1))[::-1][:-1]
        else:
            ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        if steps >= n or np.any(np.diff(ts) >= 0):
            raise ValueError(f"{steps} steps repeat timesteps with {spacing!r} spacing over {n} "
                             "training timesteps; use fewer steps")
        return np.append(ts, -1.0).astype(np.float64)

    def ddim_grid(self, steps: int, sampler: str = "ddim") -> np.ndarray:
        """diffusers DDIMScheduler's timesteps for `steps` steps (default spacing "leading"),
        then 0 (where set_alpha_to_one=False ends)."""
        n, spacing = self.num_train_timesteps, self.timestep_spacing or "leading"
        if spacing == "linspace":
            raise ValueError(f"sampler {sampler!r} on DDIMScheduler's timesteps needs "
                             "timestep_spacing 'leading' or 'trailing', not 'linspace' (uneven "
                             "DDIM steps)")
        if spacing == "leading":
            ts = np.arange(steps)[::-1] * (n // steps) + self.steps_offset
        else:
            ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        # DDIM steps from t to t - n // steps: a grid only if that is the next timestep
        if len(ts) > 1 and np.any(np.diff(ts) != -(n // steps)):
            raise ValueError(f"{spacing!r} spacing with {steps} steps has uneven "
                             f"timesteps {ts.tolist()}; use steps dividing {n}")
        return np.append(ts, 0.0) if ts[-1] > 0 else ts.astype(np.float64)


def scheduler_from_diffusers(config: dict) -> SDScheduler:
    """A diffusers scheduler_config.json (DDIM, PNDM, DPMSolverMultistep, ... of an SD
    checkpoint) -> SDScheduler; values this pipeline does not reproduce raise an error naming
    the supported ones: other noise levels (Karras / exponential / beta sigmas, lambda-uniform
    steps, a final sigma other than 0), clipping, thresholding, zero-SNR betas. The fields
    that pick a solver (solver_order, algorithm_type, solver_type, lower_order_final, ...)
    are not read: the sampler is the one `generate` is given."""
    supported = {"beta_schedule": BETA_SCHEDULES, "prediction_type": tuple(PREDICTION_TYPES),
                 "timestep_spacing": SPACINGS, "set_alpha_to_one": (False,),
                 "clip_sample": (False,), "thresholding": (False,),
                 "rescale_betas_zero_snr": (False,), "trained_betas": (None,),
                 "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,),
                 "use_beta_sigmas": (False,), "use_lu_lambdas": (False,),
                 "final_sigmas_type": ("zero",)}
    for key, valid in supported.items():
        if key in config and config[key] not in valid:
            raise ValueError(f"unsupported scheduler {key}={config[key]!r}; supported: "
                             f"{list(valid)}")
    fields = {f.name: config[f.name] for f in dataclasses.fields(SDScheduler) if f.name in config}
    return SDScheduler(**fields)


class StableDiffusion:
    """Loaded SD components (modules, variables, tokenizer, scheduler settings) on a device
    mesh (default: all devices); `generate` keeps one compiled sampler per (steps, sampler,
    guidance on/off, dtype, plan)."""

    def __init__(self, unet, unet_vars, text, text_vars, tokenizer, vae, vae_vars, scheduler,
                 *, mesh=None):
        self.mesh = make_mesh() if mesh is None else mesh
        self.unet, self.unet_vars = unet, host_to_global(unet_vars, replicated(self.mesh))
        self.vae, self.vae_vars = vae, host_to_global(vae_vars, replicated(self.mesh))
        self.text, self.text_vars, self.tokenizer = text, text_vars, tokenizer
        self.scheduler = scheduler
        self.schedule = scheduler.schedule()
        self.prediction = PREDICTION_TYPES[scheduler.prediction_type]
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._encode = jax.jit(text.apply)
        self._compiled = {}

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, mesh=None) -> "StableDiffusion":
        """Loads a local diffusers Stable Diffusion folder (`save_pretrained` layout: unet/,
        text_encoder/, tokenizer/, vae/, and scheduler/scheduler_config.json, whose absence
        means SD 1.x's settings); `mesh`: a `difflax.mesh.make_mesh` mesh."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"no Stable Diffusion folder at {folder!r}: expected a "
                                    "diffusers save_pretrained folder (unet/ text_encoder/ "
                                    "tokenizer/ vae/ scheduler/), e.g. downloaded with "
                                    "huggingface_hub.snapshot_download")
        scheduler = scheduler_from_diffusers(
            read_json(os.path.join(folder, "scheduler", "scheduler_config.json")))
        return cls(*load_sd_unet(os.path.join(folder, "unet")),
                   *load_clip_text_encoder(os.path.join(folder, "text_encoder")),
                   load_clip_tokenizer(os.path.join(folder, "tokenizer")),
                   *load_vae(os.path.join(folder, "vae")), scheduler, mesh=mesh)

    def with_unet(self, unet, unet_vars) -> "StableDiffusion":
        """This pipeline (same text encoder, VAE, scheduler, mesh) with another UNet of the same
        latent space, e.g. an A-SDM student: `difflax.accel.asdm.student(pipe.unet, ...)`
        with variables from `inherit_params(..., pipe.unet_vars, model=student)`."""
        pipe = copy.copy(self)
        pipe.unet, pipe.unet_vars = unet, host_to_global(unet_vars, replicated(self.mesh))
        pipe._compiled = {}
        return pipe

    def encode_prompts(self, prompts) -> jax.Array:
        """prompts (str or list of B str) -> the text encoder's last hidden state (B, L, D)."""
        return self._encode(self.text_vars, self.tokenizer(prompts))

    def nfe(self, steps: int, sampler: str = "ddim") -> int:
        """UNet evaluations per image (each evaluates both guidance branches at once)."""
        grid = self.scheduler.grid(steps, sampler)
        return make_solver(self.schedule, sampler, grid, prediction=self.prediction)[1]

    def generate(self, prompts=None, *, negative_prompt=None, prompt_embeds=None,
                 negative_prompt_embeds=None, latents=None, steps: int = 50,
                 sampler: str = "ddim", guidance_scale: float = 7.5, seed: int = 0,
                 height: int | None = None, width: int | None = None,
                 dtype: str = "float32", plan=None, skip_scales=None) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1] for `prompts` (str or B str; or `prompt_embeds`
        (B, L, D)).

        negative_prompt (str or B str) / negative_prompt_embeds: the unconditional branch
        (default: the empty prompt); guidance applies when guidance_scale > 1, as in
        diffusers. latents: the initial latents x_T (B, h, w, C) (diffusers' `latents`, NHWC),
        else `initial_latents(seed, B, ...)` at height x width pixels (default: the UNet's
        sample_size times the VAE's factor). sampler: a name in difflax.samplers.SAMPLERS, on
        the grid `SDScheduler.grid` gives it. dtype: "float32" or "bfloat16" (see the module
        docstring). plan: a feature-reuse plan (`difflax.accel.FeaturePlan` for `steps` steps,
        e.g. `encoder_propagation_plan(pipe.unet, 50)`, `deepcache_plan(pipe.unet, 50,
        branch=1, interval=3)`) over the UNet's feature graph. skip_scales: Skip-Tuning's
        scales on the UNet's skips (`difflax.accel.linear_skip_scales(pipe.unet.config, ...)`);
        None: 1 everywhere.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {tuple(SAMPLERS)}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {tuple(DTYPES)}")
        guided = guidance_scale > 1.0
        contexts = self._conditioning(prompts, negative_prompt, prompt_embeds,
                                      negative_prompt_embeds, guided)
        batch = contexts[0].shape[0]
        if latents is None:
            latents = self.initial_latents(seed, batch, height, width)
        latents = np.asarray(latents, np.float32)
        if latents.shape[0] != batch:
            raise ValueError(f"latents have batch size {latents.shape[0]}; the prompts {batch}")
        key = (steps, sampler, guided, dtype, plan)
        if key not in self._compiled:
            self._compiled[key] = self._sampling_fn(steps, sampler, guided, DTYPES[dtype], plan)
        padded = pad_to_mesh((latents,) + contexts, self.mesh)
        x_T, *contexts = host_to_global(padded, batch_sharded(self.mesh))
        images = self._compiled[key](self.unet_vars, self.vae_vars, x_T, tuple(contexts),
                                     np.float32(guidance_scale),
                                     host_to_global(skip_scales, replicated(self.mesh)))
        return np.asarray(images)[:batch]

    def initial_latents(self, seed: int, batch: int, height: int | None = None,
                        width: int | None = None) -> np.ndarray:
        """Standard normal x_T (batch, height / f, width / f, C), image i drawn from
        fold_in(key(seed), i): the same for any batch size and device count."""
        f, size = self.vae_scale_factor, self.unet.config.sample_size
        height, width = height or size * f, width or size * f
        if height % f or width % f:
            raise ValueError(f"height {height} and width {width} must be multiples of the "
                             f"VAE's factor {f}")
        shape = (height // f, width // f, self.unet.config.in_channels)
        key = jax.random.key(seed)
        draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), shape)
        return np.asarray(jax.vmap(draw)(jnp.arange(batch)))

    def _conditioning(self, prompts, negative_prompt, prompt_embeds, negative_prompt_embeds,
                      guided):
        """(cond,) or, with guidance, (uncond, cond): host arrays (B, L, D)."""
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompts or prompt_embeds")
        if prompt_embeds is None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            prompt_embeds = self.encode_prompts(prompts)
        cond = np.asarray(prompt_embeds, np.float32)
        if not guided:
            return (cond,)
        if negative_prompt_embeds is None:
            negative = "" if negative_prompt is None else negative_prompt
            negative = [negative] * len(cond) if isinstance(negative, str) else list(negative)
            if len(negative) != len(cond):
                raise ValueError(f"{len(negative)} negative prompts for {len(cond)} prompts")
            negative_prompt_embeds = self.encode_prompts(negative)
        return np.asarray(negative_prompt_embeds, np.float32), cond

    def _sampling_fn(self, steps, sampler, guided, dtype, plan):
        """jit of (unet_vars, vae_vars, x_T, contexts, scale, skip_scales) -> images, on the
        mesh: the sampler of `difflax.samplers.get_sample_fn` over `sd_run_fn` (guidance,
        feature cache), then the VAE decoder."""
        grid = self.scheduler.grid(steps, sampler)
        sigma_start = float(self.schedule.sigma(grid[0]))
        cast = lambda tree: jax.tree.map(lambda a: a.astype(dtype), tree)

        def model(params, labels, skip_scales):
            unet_vars, context, scale = params
            run = sd_run_fn(self.unet, cast(unet_vars), cast(context), skip_scales=skip_scales,
                            guidance_scale=scale if guided else None)

            def run_in_dtype(x, t, **cached):  # the sampler's state stays float32
                out, stored = run(None if x is None else x.astype(dtype), t, **cached)
                return (None if out is None else out.astype(jnp.float32)), stored

            return run_in_dtype if plan is not None else lambda x, t: run_in_dtype(x, t)[0]

        sample_fn, _ = get_sample_fn(model, schedule=self.schedule, sampler=sampler, grid=grid,
                                     prediction=self.prediction, plan=plan, graph=self.unet)

        def run(unet_vars, vae_vars, x_T, contexts, scale, skip_scales):
            # contexts: (cond,) or (uncond, cond), concatenated as sd_run_fn expects them;
            # the sampler starts from sigma(T) * noise, diffusers from x_T itself
            params = (unet_vars, jnp.concatenate(contexts), scale)
            z = sample_fn(params, x_T / sigma_start, None, skip_scales)
            images = self.vae.apply(cast(vae_vars), z.astype(dtype), method="decode_latents")
            return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

        repl, split = replicated(self.mesh), batch_sharded(self.mesh)
        return jax.jit(run, in_shardings=(repl, repl, split, split, repl, repl),
                       out_shardings=repl)
