"""Diffusion and flow samplers as diffrax solvers; `sample` is the entry point."""
from difflax.samplers.solve import (
    REFERENCE_SOLVERS,
    SAMPLERS,
    default_grid_kind,
    make_grid,
    make_solver,
    reference_sample,
    sample,
    solve,
)
from difflax.samplers.term import AbstractGridSolver, DiffusionTerm

__all__ = [
    "AbstractGridSolver", "DiffusionTerm", "REFERENCE_SOLVERS", "SAMPLERS", "default_grid_kind",
    "make_grid", "make_solver", "reference_sample", "sample", "solve",
]
