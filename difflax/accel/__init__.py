"""Training-free accelerations and quality boosts of a trained UNet.

`skip_tuning`: Skip-Tuning (Ma et al., ICML 2024), scales of the UNet's skip connections
as data: schedules over depth, vmapped sweeps, search, and the loss-by-noise-level analysis.
"""
from difflax.accel.skip_tuning import (denoising_loss_by_sigma, evaluate_settings, get_sweep_fn,
                                       linear_skip_scales, per_resolution_skip_scales,
                                       per_skip_scales, search, stack_skip_scales)

__all__ = ["denoising_loss_by_sigma", "evaluate_settings", "get_sweep_fn", "linear_skip_scales",
           "per_resolution_skip_scales", "per_skip_scales", "search", "stack_skip_scales"]
