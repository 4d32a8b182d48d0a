"""DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Alg. 2 and its 3rd-order
extension) in the data-prediction form, and DPM-Solver multistep in the noise form.

Both integrate the Lagrange interpolant (in log-SNR lambda) of the last outputs exactly,
via closed forms in `coefficients.logsnr_multistep` (the official code's "taylor" variant;
Alg. 2's (1 + 1/2r) rule differs by O(h^3) per step). `lower_order_final` (default on for
fewer than 15 steps, as the official code) drops the order on the last steps.
"""
from __future__ import annotations

from difflax.samplers import coefficients as coef
from difflax.samplers.deis import _check_order, _multistep, check_alpha_positive


def dpm_multistep(schedule, grid, *, order=2, form="x0", lower_order_final=None):
    """DPM-Solver(++)-`order`M; form "x0" = DPM-Solver++ (data), "eps" = DPM-Solver (noise)."""
    n = len(grid) - 1
    _check_order(f"dpm ({order}M)", order, range(1, 4), n + 1)
    if form not in ("x0", "eps"):
        raise ValueError(f"form must be one of ('x0', 'eps'), got {form!r}")
    check_alpha_positive("dpm", schedule, grid)
    if lower_order_final is None:
        lower_order_final = n < 15
    a, b = coef.logsnr_multistep(schedule, grid, order - 1, form, lower_order_final)
    return _multistep(grid, a, b, form), n


def dpmpp_2m(schedule, grid, *, lower_order_final=None):
    """DPM-Solver++(2M): second order, data prediction."""
    return dpm_multistep(schedule, grid, order=2, form="x0", lower_order_final=lower_order_final)


def dpmpp_3m(schedule, grid, *, lower_order_final=None):
    """DPM-Solver++(3M): third order, data prediction."""
    return dpm_multistep(schedule, grid, order=3, form="x0", lower_order_final=lower_order_final)
