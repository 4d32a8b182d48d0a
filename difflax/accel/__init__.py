"""Training-free accelerations and quality boosts of a trained UNet.

`skip_tuning`: Skip-Tuning (Ma et al., ICML 2024), scales of the UNet's skip connections
as data: schedules over depth, vmapped sweeps, search, and the loss-by-noise-level analysis.
`feature_reuse`: Faster Diffusion's encoder propagation (with parallel decoding and prior
noise injection), DeepCache's deep-branch reuse and A-SDM's feature inheritance, as static
plans over the UNet's feature cache, sampled with `sample_with_plan`.
`feature_similarity`: the diagnostic behind them, how much each feature node changes between
adjacent steps of a sampling trajectory (Faster Diffusion's Fig. 2 analogue).
`assembly`: A-SDM model assembly: students by surgery, initialised from the teacher (CLME),
parameter and FLOP counts, multi-UNet switching.
"""
from difflax.accel.assembly import (MultiUNetDenoiser, count_params, denoiser_flops,
                                    get_multi_unet_fn, inherit_params, student, switch_sigma)
from difflax.accel.feature_reuse import (FASTER_DIFFUSION_KEY_STEPS, FeaturePlan, PlanCost,
                                         cache_capable_samplers, deepcache_plan, deepcache_refresh_steps,
                                         denoiser_run_fn, encoder_nodes,
                                         encoder_propagation_plan, faster_diffusion_key_steps,
                                         full_plan, inheritance_nodes, inheritance_plan,
                                         node_flops, plan_cost, quad_center_steps,
                                         sample_with_plan)
from difflax.accel.feature_similarity import FeatureSimilarity, adjacent_step_similarity
from difflax.accel.skip_tuning import (denoising_loss_by_sigma, evaluate_settings, get_sweep_fn,
                                       linear_skip_scales, per_resolution_skip_scales,
                                       per_skip_scales, search, stack_skip_scales,
                                       time_dependent_skip_scales)

__all__ = [
    "MultiUNetDenoiser", "count_params", "denoiser_flops", "get_multi_unet_fn", "inherit_params",
    "student", "switch_sigma",
    "FeatureSimilarity", "adjacent_step_similarity",
    "FASTER_DIFFUSION_KEY_STEPS", "FeaturePlan", "PlanCost", "cache_capable_samplers",
    "deepcache_plan",
    "deepcache_refresh_steps", "denoiser_run_fn", "denoising_loss_by_sigma", "encoder_nodes",
    "encoder_propagation_plan", "evaluate_settings", "faster_diffusion_key_steps", "full_plan",
    "get_sweep_fn", "inheritance_nodes", "inheritance_plan", "linear_skip_scales", "node_flops",
    "per_resolution_skip_scales", "per_skip_scales", "plan_cost", "quad_center_steps", "sample_with_plan", "search",
    "stack_skip_scales", "time_dependent_skip_scales",
]
