"""Faster Diffusion: encoder propagation, parallel decoding and prior noise injection.

Li et al., "Faster Diffusion: Rethinking the Role of the Encoder for Diffusion Model
Inference" (NeurIPS 2024; code hutaiHang/Faster-Diffusion, `utils_sd.py`, `sd_demo.py`). Each
method here is a `difflax.samplers.FeaturePlan` over the network's feature graph
(difflax.models.graph), run by `difflax.samplers.sample_with_plan` (or the sampling factory's
`plan=`), so it applies to every network that declares a graph (EDM UNets, SiT, SD's UNet).

- Sec. 3.2 (the analysis): encoder features change little between adjacent steps, decoder
  features much more (its Fig. 2; `difflax.accel.adjacent_step_similarity` measures it).
- Sec. 3.3, *encoder propagation*: at key steps the encoder and the middle (bottleneck) run
  and their outputs are cached: every skip tensor (the first convolution's output included)
  and the middle output, `encoder_nodes`; the non-key steps run the decoder only, on the
  cached features. Key steps (`faster_diffusion_key_steps`): 0, 1, 2, 3, 5, 10, 15, 25, 35
  for DDIM with 50 steps, the same list cut to 0..15 for DPM-Solver with 20, the code's rules
  for 75 and 100 steps, and no default for other step counts; `every=k` is the paper's
  uniform ablation. `encoder_propagation_plan` builds the plan.
- Sec. 3.3, *parallel decoding* (`parallel=True`): a key step and the non-key steps up to the
  next key step form one network call, the decoder running once on the features tiled k
  times with the k steps' time embeddings (batch k x B); the sampler then updates with the
  k outputs one after another.
- Sec. 3.4, *prior noise injection* (`PriorNoiseInjection`): z_t <- z_t + alpha z_T,
  alpha = 0.003, at the steps with t / T < tau = 0.5. As in the authors' code it is added
  before each step's model call; with parallel decoding after the chunk's batched call,
  before each of its updates (their `register_parallel_pipeline`; the cache's solver,
  `difflax.samplers.FeatureReuseSolver`, applies it).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from difflax.models.graph import feature_graph
from difflax.samplers.cached import FeaturePlan
from difflax.schedules import VPDiscrete

FASTER_DIFFUSION_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)


@dataclasses.dataclass(frozen=True)
class PriorNoiseInjection:
    """Faster Diffusion's prior noise injection (Sec. 3.4): alpha z_T added to the state
    z_t before the steps with t / T < tau (the code: alpha = 0.003, tau = 0.5)."""

    alpha: float = 0.003
    tau: float = 0.5

    def coefficients(self, schedule, grid) -> np.ndarray:
        """(steps,) weights of the initial state x_T added before each step of `grid`.

        z_T is the initial state in variance-preserving units, so the weight is alpha times
        the state's scale sqrt(alpha_t^2 + sigma_t^2) at the step over that of the first
        step, where the step's start time t has t / T < tau, else 0. T is the schedule's
        horizon: the number of training steps N of `vp_discrete` (t is the step index, as
        Faster Diffusion's t / 1000), else t_max (on EDM's schedule, where t = sigma, that is
        sigma < tau sigma_max).
        """
        g = np.asarray(grid, np.float64)[:-1]
        scale = np.sqrt(np.asarray(schedule.alpha(g)) ** 2 + np.asarray(schedule.sigma(g)) ** 2)
        horizon = schedule.t_max + 1 if isinstance(schedule, VPDiscrete) else schedule.t_max
        return np.where(g / horizon < self.tau, self.alpha * scale / scale[0], 0.0)


def faster_diffusion_key_steps(steps: int) -> tuple[int, ...]:
    """The key steps of Faster Diffusion's code (hutaiHang/Faster-Diffusion, `utils_sd.py`).

    50 steps: 0 1 2 3 5 10 15 25 35 (its default rule "50ls", Sec. 4 DDIM); 20 steps: the same
    rule, 0 1 2 3 5 10 15 (DPM-Solver); 100 / 75 steps: its "100ls" / "75ls" rules, step i is
    a key step if i < 10, i % 5 == 0, or i > 85 (100) / i > 65 (75). Other step counts have
    no rule in the code: pass `key_steps=` or `every=` to `encoder_propagation_plan`.
    """
    if steps in (20, 50):
        return tuple(k for k in FASTER_DIFFUSION_KEY_STEPS if k < steps)
    if steps in (75, 100):
        last = 65 if steps == 75 else 85
        return tuple(i for i in range(steps) if i < 10 or i % 5 == 0 or i > last)
    raise ValueError(f"Faster Diffusion's code has key steps for 20, 50, 75 or 100 steps, not "
                     f"{steps}; pass key_steps= or every=")


def encoder_nodes(model) -> frozenset:
    """The encoder and middle nodes of the model's graph: for a UNet every skip tensor and
    the middle blocks' output."""
    return frozenset(feature_graph(model).names("encoder", "middle"))


def encoder_propagation_plan(model, steps: int, *, key_steps: Sequence[int] | None = None,
                             every: int | None = None, parallel: bool = False,
                             noise_injection: float = 0.0, tau: float = 0.5,
                             max_decode_batch: int | None = None) -> FeaturePlan:
    """Faster Diffusion: encoder + middle at key steps only, the decoder at every step.

    Key steps: `key_steps`, or every `every`-th step (the paper's uniform ablation), or by
    default `faster_diffusion_key_steps(steps)`. `parallel=True` decodes each key step's
    chunk in one batched call (Sec. 3.3); `noise_injection=0.003` is the paper's prior noise
    injection (Sec. 3.4, `PriorNoiseInjection`), added at steps with t / T < `tau` (its
    code: t / 1000 < 0.5). `max_decode_batch` bounds the latents of one batched decoder call
    (`FeaturePlan.max_decode_batch`; None: a whole chunk at once, as the paper).
    """
    if key_steps is not None and every is not None:
        raise ValueError("pass key_steps= or every=, not both")
    if every is not None:
        key_steps = range(0, steps, int(every))
    keys = set(faster_diffusion_key_steps(steps) if key_steps is None else key_steps)
    if not keys <= set(range(steps)):
        raise ValueError(f"key steps {sorted(keys - set(range(steps)))} are outside 0..{steps - 1}")
    name = "encoder propagation" + (" + parallel" if parallel else "")
    injection = PriorNoiseInjection(noise_injection, tau) if noise_injection else None
    return FeaturePlan(encoder_nodes(model), tuple(i in keys for i in range(steps)),
                       parallel=parallel, injection=injection, name=name,
                       max_decode_batch=max_decode_batch)
