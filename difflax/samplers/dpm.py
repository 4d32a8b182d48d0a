"""DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Alg. 2 and its third-order
extension) in the data-prediction form, and DPM-Solver multistep in the noise form.

By default each name means what the official DPM-Solver code and diffusers'
`DPMSolverMultistepScheduler` do by default: second-order steps use Alg. 2's "midpoint" rule
(diffusers' solver_type="midpoint"), third-order steps the official D2 weight, the first step
is first order and the order rises by one per step (warm start), and `lower_order_final`
(default on for fewer than 15 steps) drops to first / second order on the last two steps; a
step to sigma = 0 returns the data prediction. Options: solver_type="heun" (diffusers' "heun",
the official code's "taylor") and "exact", which integrates the Lagrange interpolant in
log-SNR exactly at every order (equal to "heun" at second order; at third order twice the
official D2 weight: more accurate at many steps, not what the published numbers used).
Tables: `coefficients.dpm_solver_multistep`.
"""
from __future__ import annotations

from difflax.samplers import coefficients as coef
from difflax.samplers.deis import check_alpha_positive
from difflax.samplers.multistep import check_order, multistep_solver


def dpm_multistep(schedule, grid, *, order=2, form="x0", lower_order_final=None,
                  solver_type="midpoint"):
    """DPM-Solver(++)-`order`M; form "x0" = DPM-Solver++ (data), "eps" = DPM-Solver (noise)."""
    n = len(grid) - 1
    check_order(f"dpm ({order}M)", order, range(1, 4), n + 1)
    if form not in ("x0", "eps"):
        raise ValueError(f"form must be one of ('x0', 'eps'), got {form!r}")
    check_alpha_positive("dpm", schedule, grid)
    if lower_order_final is None:
        lower_order_final = n < 15
    a, b = coef.dpm_solver_multistep(schedule, grid, order - 1, form, lower_order_final,
                                     solver_type)
    return multistep_solver(grid, a, b, form), n


def dpmpp_2m(schedule, grid, *, lower_order_final=None, solver_type="midpoint"):
    """DPM-Solver++(2M): second order, data prediction (Alg. 2; diffusers' default)."""
    return dpm_multistep(schedule, grid, order=2, form="x0", lower_order_final=lower_order_final,
                         solver_type=solver_type)


def dpmpp_3m(schedule, grid, *, lower_order_final=None, solver_type="midpoint"):
    """DPM-Solver++(3M): third order, data prediction (the official code / diffusers)."""
    return dpm_multistep(schedule, grid, order=3, form="x0", lower_order_final=lower_order_final,
                         solver_type=solver_type)
