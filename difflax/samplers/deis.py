"""DEIS (Zhang & Chen 2023): tAB, rhoAB, log-rho AB, rhoRK and iPNDM, plus DDIM.

All work on y = x / alpha, which solves dy/drho = eps(x, t) (eq. 13): AB rules extrapolate
eps by a polynomial through the last outputs and integrate it exactly (eq. 14-15); rhoRK runs
a classical Runge-Kutta method in rho. Each factory returns (solver, nfe).
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from difflax.samplers import coefficients as coef
from difflax.samplers.multistep import check_order, multistep_solver
from difflax.samplers.term import AbstractGridSolver


def check_alpha_positive(name, schedule, grid):
    """rho-space samplers divide by alpha at every evaluation time."""
    alpha = np.asarray(schedule.alpha(grid[:-1]))
    if np.any(alpha <= 0):
        raise ValueError(f"{name} works in rho = sigma / alpha and needs alpha > 0 on the grid; "
                         f"it starts at t = {grid[0]} where alpha = 0: start below it "
                         "(e.g. t_max=0.999) or use 'ddim', 'rf_euler' or 'rf_heun'")


def ddim(schedule, grid, *, prediction="eps"):
    """DDIM (Song et al. 2021 eq. 12) = exponential Euler = tAB order 0 (DEIS prop. 2).

    x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} eps. Run in the data form for non-eps models, so
    it also starts from alpha = 0 (rectified flow at t = 1).
    """
    form = "eps" if prediction in ("eps", "score") else "x0"
    if form == "eps":
        check_alpha_positive("ddim", schedule, grid)
    a, b = coef.logsnr_multistep(schedule, grid, 0, form)
    return multistep_solver(grid, a, b, form), len(grid) - 1


def deis_tab(schedule, grid, *, order=2, lower_order_final=False):
    """tAB-DEIS: eps extrapolated by a degree-`order` polynomial in t (eq. 15); order 0 = DDIM.

    t is the schedule's own time: on the EDM schedule t = sigma = rho, so there deis_tab is
    the same method as deis_rhoab (DEIS defines tAB on the VP SDE's time).
    """
    check_order("deis_tab", order, range(4), len(grid) - 1)
    check_alpha_positive("deis_tab", schedule, grid)
    a, b = coef.eps_multistep(schedule, grid, order, "t", lower_order_final)
    return multistep_solver(grid, a, b, "eps"), len(grid) - 1


def deis_rhoab(schedule, grid, *, order=2, lower_order_final=False):
    """rhoAB-DEIS: eps extrapolated by a degree-`order` polynomial in rho (sec. 4)."""
    check_order("deis_rhoab", order, range(1, 4), len(grid) - 1)
    check_alpha_positive("deis_rhoab", schedule, grid)
    a, b = coef.eps_multistep(schedule, grid, order, "rho", lower_order_final)
    return multistep_solver(grid, a, b, "eps"), len(grid) - 1


def deis_logrho(schedule, grid, *, order=1, lower_order_final=False):
    """log-rho AB-DEIS: degree-`order` polynomial in log rho, integrated by quadrature.

    The same method as DPM-Solver multistep in the noise form (degree 1 = DPM-Solver-2M).
    """
    check_order("deis_logrho", order, range(0, 4), len(grid) - 1)
    check_alpha_positive("deis_logrho", schedule, grid)
    a, b = coef.eps_multistep(schedule, grid, order, "logrho", lower_order_final)
    return multistep_solver(grid, a, b, "eps"), len(grid) - 1


def ipndm(schedule, grid, *, order=4):
    """iPNDM (DEIS app. / Liu et al. 2022): fixed Adams-Bashforth weights on eps in rho,
    warm-started through the lower orders (no Runge-Kutta start), each step scaled by DDIM's
    eps coefficient alpha_{i+1} (rho_{i+1} - rho_i), as DEIS's code. DEIS's code runs it on a
    grid uniform in t (VP only); `sample` picks that grid for VP schedules by default."""
    check_order("ipndm", order, range(1, 5), len(grid))
    check_alpha_positive("ipndm", schedule, grid)
    a, b = coef.ipndm(schedule, grid, order)
    return multistep_solver(grid, a, b, "eps"), len(grid) - 1


class RhoRungeKutta(AbstractGridSolver):
    """rhoRK-DEIS: an explicit Runge-Kutta method on dy/drho = eps (sec. 4, eq. 13).

    h (N,), stage_t / stage_alpha (N, S), alpha (N+1,); the tableau is static.
    """

    h: jax.Array
    stage_t: jax.Array
    stage_alpha: jax.Array
    alpha: jax.Array
    tableau: tuple = eqx.field(static=True)

    def _step(self, term, i, x, state):
        a_rows, b_row, _ = self.tableau
        y, h, ks = x / self.alpha[i], self.h[i], []
        for s, row in enumerate(a_rows):
            ys = y + h * sum(aj * k for aj, k in zip(row, ks)) if row else y
            ks.append(term.predict(self.stage_t[i, s], self.stage_alpha[i, s] * ys, "eps"))
        y1 = y + h * sum(bs * k for bs, k in zip(b_row, ks))
        return (self.alpha[i + 1] * y1).astype(x.dtype), state


def deis_rhork(schedule, grid, *, method="kutta3"):
    """rhoRK-DEIS with a tableau of `coefficients.TABLEAUX`: "heun" (2 NFE/step), "kutta3"
    (DEIS's default "3kutta"), "ral3", "heun3", "vdh3", "ssprk3" (3) or "rk4" (4)."""
    if method not in coef.TABLEAUX:
        raise ValueError(f"deis_rhork: method must be one of {tuple(coef.TABLEAUX)}, "
                         f"got {method!r}")
    check_alpha_positive("deis_rhork", schedule, grid)
    if schedule.sigma(grid[-1]) == 0:
        raise ValueError("deis_rhork: its last stage evaluates the model at sigma = 0; end the "
                         "grid at t_min > t_zero")
    tableau = coef.TABLEAUX[method]
    h, st, sa, alpha = coef.rk_stages(schedule, grid, tableau[2])
    solver = RhoRungeKutta(h=jnp.asarray(h), stage_t=jnp.asarray(st),
                           stage_alpha=jnp.asarray(sa), alpha=jnp.asarray(alpha),
                           tableau=tableau)
    return solver, len(tableau[1]) * (len(grid) - 1)
