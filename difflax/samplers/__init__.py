"""Diffusion and flow samplers as diffrax solvers; `sample` is the entry point, `get_sample_fn`
the factory every caller builds its (optionally sharded) sampler with, `sample_with_plan` the
sampler with a feature cache that every feature-reuse plan (difflax.accel) runs on."""
from difflax.samplers.cached import (FeaturePlan, FeatureReuseSolver, PlanCost,
                                     cache_capable_samplers, denoiser_run_fn, full_plan,
                                     node_flops, plan_cost, sample_with_plan)
from difflax.samplers.factory import (denoiser_model, get_sample_fn, keyed_sample_fn,
                                      shard_sample_fn)
from difflax.samplers.solve import (
    ORDER_IN_NAME,
    REFERENCE_SOLVERS,
    SAMPLERS,
    default_grid_kind,
    make_grid,
    make_solver,
    reference_sample,
    sample,
    solve,
    split_sampler_name,
)
from difflax.samplers.term import AbstractGridSolver, DiffusionTerm

__all__ = [
    "FeaturePlan", "FeatureReuseSolver", "PlanCost", "cache_capable_samplers", "denoiser_run_fn",
    "full_plan", "node_flops", "plan_cost", "sample_with_plan",
    "AbstractGridSolver", "DiffusionTerm", "ORDER_IN_NAME", "REFERENCE_SOLVERS", "SAMPLERS",
    "default_grid_kind", "denoiser_model", "get_sample_fn", "keyed_sample_fn", "make_grid", "make_solver",
    "reference_sample", "sample", "shard_sample_fn", "solve", "split_sampler_name",
]
