"""Exact per-step coefficient tables, computed once on the host in float64 numpy.

Every multistep sampler here is a *linear exponential multistep* rule

    x_{i+1} = A_i x_i + sum_j B_ij p_{i-j},     p = eps (noise form) or x0 (data form),

on a decreasing grid t_0 > t_1 > ... > t_N. In the noise form, y = x / alpha solves
dy/drho = eps (DEIS, Zhang & Chen 2023 eq. 13), so A_i = alpha_{i+1} / alpha_i and

    B_ij = alpha_{i+1} int_{rho_i}^{rho_{i+1}} l_j(u(rho)) d rho             (DEIS eq. 14-15)

where l_j is the Lagrange basis on the previous nodes u(t_i), ..., u(t_{i-q}) and u is the
variable in which eps is extrapolated: t (tAB), rho (rhoAB) or log rho (DEIS's log-rho AB,
identical to DPM-Solver multistep). In the data form z = x / sigma solves dz/d(e^lambda) = x0
(DPM-Solver++, Lu et al. 2022 eq. 9), so A_i = sigma_{i+1} / sigma_i.

Quadrature: composite 20-point Gauss-Legendre in log rho on panels of width <= 1/4, split at
the schedule's breakpoints (VP discrete), accurate to ~1e-14 relative (the official DEIS code
uses a 10,000-point Riemann sum). Closed forms (exponential times polynomial, i.e.
DPM-Solver's phi functions) are used for the log-SNR rules.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from difflax.schedules import AbstractSchedule

GL_NODES = 20
PANEL = 0.25  # panel width in log rho
TAIL = 50.0  # an integral down to rho = 0 is cut at log rho_i - TAIL (error ~ e^-50)


@functools.lru_cache(maxsize=8)
def _leggauss(n):
    return np.polynomial.legendre.leggauss(n)


def lagrange_basis(nodes, u):
    """l_j(u) for the Lagrange basis on `nodes` (q+1,); returns (q+1, *u.shape)."""
    nodes = np.asarray(nodes, np.float64)
    u = np.asarray(u, np.float64)
    out = []
    for j, nj in enumerate(nodes):
        lj = np.ones_like(u)
        for k, nk in enumerate(nodes):
            if k != j:
                lj = lj * (u - nk) / (nj - nk)
        out.append(lj)
    return np.stack(out)


def integrate_rho(f, rho_a, rho_b, rho_breaks=(), n=GL_NODES, panel=PANEL):
    """int_{rho_a}^{rho_b} f(rho) d rho (signed) by composite Gauss-Legendre in u = log rho.

    f maps an array of rho (M,) to (..., M). rho_b may be 0 (the sigma = 0 end).
    """
    ua = math.log(rho_a)
    ub = math.log(rho_b) if rho_b > 0 else None
    lo, hi = (ua - TAIL if ub is None else min(ua, ub)), (ua if ub is None else max(ua, ub))
    breaks = [math.log(r) for r in rho_breaks if r > 0 and lo < math.log(r) < hi]
    edges = np.unique(np.concatenate([[lo, hi], breaks]))
    # refine every piece into panels of width <= panel
    fine = [np.linspace(a, b, max(1, math.ceil((b - a) / panel)) + 1)[:-1]
            for a, b in zip(edges[:-1], edges[1:])]
    edges = np.append(np.concatenate(fine), hi)
    x, w = _leggauss(n)
    mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
    u = (mid[:, None] + half[:, None] * x[None, :]).ravel()
    wu = (half[:, None] * w[None, :]).ravel()
    rho = np.exp(u)
    total = np.sum(f(rho) * (wu * rho), axis=-1)
    sign = 1.0 if (ub is not None and ub > ua) else -1.0
    return sign * total


def step_orders(n_steps, order, lower_order_final=False):
    """Number of previous outputs q_i used at step i: warm start min(order, i), and with
    `lower_order_final` also min(., N-1-i) (DPM-Solver's lower_order_final)."""
    i = np.arange(n_steps)
    q = np.minimum(order, i)
    if lower_order_final:
        q = np.minimum(q, n_steps - 1 - i)
    return q


def _tables(schedule: AbstractSchedule, grid):
    g = np.asarray(grid, np.float64)
    return g, np.asarray(schedule.alpha(g), np.float64), np.asarray(schedule.sigma(g), np.float64)


def eps_multistep(schedule, grid, order, basis="t", lower_order_final=False):
    """DEIS AB tables (A (N,), B (N, order+1)) in the noise form, polynomial in `basis`.

    basis "t": tAB (DEIS eq. 15); "rho": rhoAB; "logrho": DEIS log-rho AB = DPM-Solver.
    All by quadrature (exact for "rho", where the integrand is a polynomial).
    """
    g, alpha, sigma = _tables(schedule, grid)
    rho = sigma / alpha
    n = len(g) - 1
    var = {"t": g, "rho": rho, "logrho": np.log(np.maximum(rho, 1e-300))}[basis]
    to_var = {"t": lambda r: np.asarray(schedule.t_from_rho(r), np.float64),
              "rho": lambda r: r, "logrho": np.log}[basis]
    rho_breaks = np.asarray(schedule.rho(schedule.breakpoints()), np.float64)
    a = alpha[1:] / alpha[:-1]
    b = np.zeros((n, order + 1))
    for i, q in enumerate(step_orders(n, order, lower_order_final)):
        nodes = var[i - q:i + 1][::-1]
        b[i, :q + 1] = alpha[i + 1] * integrate_rho(
            lambda r: lagrange_basis(nodes, to_var(r)), rho[i], rho[i + 1], rho_breaks)
    return a, b


# Adams-Bashforth weights for equal steps; iPNDM (Zhang & Chen 2023 app. / Liu et al. 2022
# PNDM eq. 12) applies them to eps in rho with warm start through the lower orders.
AB_WEIGHTS = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def ipndm(schedule, grid, order):
    """iPNDM tables: B_ij = alpha_{i+1} (rho_{i+1} - rho_i) w^{(q_i)}_j, q_i = min(order-1, i)."""
    g, alpha, sigma = _tables(schedule, grid)
    rho = sigma / alpha
    n = len(g) - 1
    b = np.zeros((n, order))
    for i, q in enumerate(step_orders(n, order - 1)):
        b[i, :q + 1] = alpha[i + 1] * (rho[i + 1] - rho[i]) * np.asarray(AB_WEIGHTS[q])
    return alpha[1:] / alpha[:-1], b


def _monomial_coeffs(nodes):
    """C with l_j(u0 + tau) = sum_k C[j, k] tau^k for the Lagrange basis on nodes (u0 first)."""
    if len(nodes) == 1:  # also when the node is lambda = -inf (alpha = 0, rectified flow t = 1)
        return np.ones((1, 1))
    tau = np.asarray(nodes, np.float64) - nodes[0]
    vander = tau[:, None] ** np.arange(len(tau))[None, :]
    return np.linalg.inv(vander).T


def _exp_moments(h, q, sign):
    """int_0^h e^{sign (tau - h)} tau^k d tau for k = 0..q (sign=+1); for sign=-1,
    int_0^h e^{-tau} tau^k d tau. Closed forms via expm1 (DPM-Solver's phi functions)."""
    m = np.zeros(q + 1)
    if sign > 0:  # I_k = h^k - k I_{k-1}, I_0 = 1 - e^-h
        m[0] = -math.expm1(-h)
        for k in range(1, q + 1):
            m[k] = h**k - k * m[k - 1]
    else:  # K_k = -h^k e^-h + k K_{k-1}, K_0 = 1 - e^-h
        m[0] = -math.expm1(-h)
        for k in range(1, q + 1):
            m[k] = (0.0 if math.isinf(h) else -h**k * math.exp(-h)) + k * m[k - 1]
    return m


def logsnr_multistep(schedule, grid, order, form="x0", lower_order_final=False):
    """DPM-Solver(++) multistep tables in closed form (Lu et al. 2022, Alg. 2 and app. B).

    form "x0" (DPM-Solver++): x_{i+1} = sigma_{i+1}/sigma_i x_i + alpha_{i+1} sum_k d_k I_k,
    I_k = int_0^h e^{tau - h} tau^k, with the data prediction's Lagrange interpolant in lambda
    written as sum_k d_k tau^k; its final step to sigma = 0 is first order (x_{N} = x0).
    form "eps" (DPM-Solver): x_{i+1} = alpha_{i+1}/alpha_i x_i - alpha_{i+1} rho_i sum_k d_k K_k.
    The polynomial is integrated exactly (the official code's "taylor" variant).
    """
    g, alpha, sigma = _tables(schedule, grid)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    n = len(g) - 1
    q_i = step_orders(n, order, lower_order_final)
    b = np.zeros((n, order + 1))
    if form == "x0":
        a = sigma[1:] / sigma[:-1]
        for i, q in enumerate(q_i):
            q = 0 if sigma[i + 1] == 0 else q
            h = lam[i + 1] - lam[i]
            c = _monomial_coeffs(lam[i - q:i + 1][::-1])
            b[i, :q + 1] = alpha[i + 1] * c @ _exp_moments(h, q, +1)
    else:
        a = alpha[1:] / alpha[:-1]
        for i, q in enumerate(q_i):
            h = lam[i + 1] - lam[i]
            c = _monomial_coeffs(lam[i - q:i + 1][::-1])
            b[i, :q + 1] = -alpha[i + 1] * (sigma[i] / alpha[i]) * c @ _exp_moments(h, q, -1)
    return a, b


# Butcher tableaux (a, b, c) for rhoRK (DEIS sec. 4, "rhoRK-DEIS").
TABLEAUX = {
    "heun": (((), (1.0,)), (0.5, 0.5), (0.0, 1.0)),
    "kutta3": (((), (0.5,), (-1.0, 2.0)), (1 / 6, 2 / 3, 1 / 6), (0.0, 0.5, 1.0)),
    "rk4": (((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6),
            (0.0, 0.5, 0.5, 1.0)),
}


def rk_stages(schedule, grid, c):
    """Stage tables for RK in rho: h (N,), stage times and alphas (N, S), alpha (N+1,)."""
    g, alpha, sigma = _tables(schedule, grid)
    rho = sigma / alpha
    h = rho[1:] - rho[:-1]
    c = np.asarray(c, np.float64)
    stage_rho = rho[:-1, None] + c[None, :] * h[:, None]
    stage_t = np.asarray(schedule.t_from_rho(stage_rho), np.float64)
    stage_t[:, c == 0] = g[:-1, None]
    stage_t[:, c == 1] = g[1:, None]
    return h, stage_t, np.asarray(schedule.alpha(stage_t), np.float64), alpha
