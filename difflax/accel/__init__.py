"""Training-free accelerations and quality boosts of a trained network, one module per paper.

`skip_tuning`: Skip-Tuning (Ma et al., ICML 2024), scales of the UNet's skip connections
as data: schedules over depth, vmapped sweeps, search, and the loss-by-noise-level analysis.
`faster_diffusion`: Faster Diffusion's encoder propagation (key steps, parallel decoding,
prior noise injection) as a feature plan. `deepcache`: DeepCache's deep-branch reuse (branch
node, uniform and non-uniform refresh steps) as a feature plan. `asdm`: A-SDM (a package
whose docstring maps the papers to the code): model assembly (surgery, CLME-CondConv, GRI
attention, multi-UNet switching), feature inheritance plans, the distillation loss's terms.
`feature_similarity`: the diagnostic behind the plans, how much each feature node changes
between adjacent steps of a sampling trajectory (Faster Diffusion's Fig. 2 analogue).

The plans are `FeaturePlan`s of the feature cache shared by all of them, which lives below
the sampling factory in `difflax.samplers.cached` (`sample_with_plan`, `plan_cost`, ...); its
public names are re-exported here, beside the plans that use them.
"""
from difflax.accel.asdm import (MultiUNetDenoiser, count_params, denoiser_flops,
                                get_multi_unet_fn, inherit_params, inheritance_nodes,
                                inheritance_plan, student, switch_sigma)
from difflax.accel.deepcache import (deepcache_branch_node, deepcache_plan,
                                     deepcache_refresh_steps, quad_center_steps)
from difflax.accel.faster_diffusion import (FASTER_DIFFUSION_KEY_STEPS, PriorNoiseInjection,
                                            encoder_nodes, encoder_propagation_plan,
                                            faster_diffusion_key_steps)
from difflax.accel.feature_similarity import FeatureSimilarity, adjacent_step_similarity
from difflax.accel.skip_tuning import (denoising_loss_by_sigma, evaluate_settings, get_sweep_fn,
                                       linear_skip_scales, per_resolution_skip_scales,
                                       per_skip_scales, search, stack_skip_scales,
                                       time_dependent_skip_scales)
from difflax.samplers.cached import (FeaturePlan, PlanCost, cache_capable_samplers,
                                     denoiser_run_fn, full_plan, node_flops, plan_cost,
                                     sample_with_plan)

__all__ = [
    "MultiUNetDenoiser", "count_params", "denoiser_flops", "get_multi_unet_fn", "inherit_params",
    "student", "switch_sigma",
    "FeatureSimilarity", "adjacent_step_similarity",
    "FASTER_DIFFUSION_KEY_STEPS", "FeaturePlan", "PlanCost", "PriorNoiseInjection",
    "cache_capable_samplers", "deepcache_branch_node", "deepcache_plan",
    "deepcache_refresh_steps", "denoiser_run_fn", "denoising_loss_by_sigma", "encoder_nodes",
    "encoder_propagation_plan", "evaluate_settings", "faster_diffusion_key_steps", "full_plan",
    "get_sweep_fn", "inheritance_nodes", "inheritance_plan", "linear_skip_scales", "node_flops",
    "per_resolution_skip_scales", "per_skip_scales", "plan_cost", "quad_center_steps", "sample_with_plan", "search",
    "stack_skip_scales", "time_dependent_skip_scales",
]
