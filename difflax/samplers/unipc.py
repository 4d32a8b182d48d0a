"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
of Diffusion Models"): the UniP-p predictor with the UniC corrector (order p+1), B(h) = h
("bh1") or e^h - 1 ("bh2"), as diffusers' `UniPCMultistepScheduler` by default: order 2,
bh2, data prediction, the corrector after every step but the last (it would need one more
model call), warm start through the lower orders and `lower_order_final` (the last step first
order, whatever the number of steps). The authors' `UniPC` class defaults to bh1 instead
(variant="bh1" here). Tables: `coefficients.unipc`.
"""
from __future__ import annotations

from difflax.samplers import coefficients as coef
from difflax.samplers.deis import check_alpha_positive
from difflax.samplers.multistep import check_order, multistep_solver


def unipc(schedule, grid, *, order=2, variant="bh2", form="x0", lower_order_final=True,
          disable_corrector=()):
    """UniPC-`order` (`form` "x0" = diffusers' predict_x0=True, "eps" = its noise form);
    `disable_corrector`: step indices whose corrector is skipped, as diffusers' option."""
    n = len(grid) - 1
    check_order("unipc", order, range(1, 4), n + 1)
    if form not in ("x0", "eps"):
        raise ValueError(f"unipc: form must be one of ('x0', 'eps'), got {form!r}")
    check_alpha_positive("unipc", schedule, grid)
    if form == "eps" and schedule.sigma(grid[-1]) == 0:
        raise ValueError("unipc: form 'eps' cannot step to sigma = 0; use form='x0' or end the "
                         "grid at t_min > t_zero")
    a, b = coef.unipc(schedule, grid, order, form, variant, lower_order_final,
                      tuple(disable_corrector))
    return multistep_solver(grid, a, b, form), n
