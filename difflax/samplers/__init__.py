"""Diffusion and flow samplers as diffrax solvers; `sample` is the entry point, `get_sample_fn`
the factory every caller builds its (optionally sharded) sampler with."""
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
    "AbstractGridSolver", "DiffusionTerm", "ORDER_IN_NAME", "REFERENCE_SOLVERS", "SAMPLERS",
    "default_grid_kind", "denoiser_model", "get_sample_fn", "keyed_sample_fn", "make_grid", "make_solver",
    "reference_sample", "sample", "shard_sample_fn", "solve", "split_sampler_name",
]
