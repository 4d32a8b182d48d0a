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


def _logsnr_tables(schedule, grid):
    """_tables plus log-SNR lambda (N+1,); lambda = +inf where sigma = 0, -inf where alpha = 0."""
    g, alpha, sigma = _tables(schedule, grid)
    with np.errstate(divide="ignore"):
        return g, alpha, sigma, np.log(alpha) - np.log(sigma)


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
    The polynomial is integrated exactly: the official code's "taylor" rule at second order,
    twice its D2 weight at third (`dpm_solver_multistep` gives the official rules).
    """
    g, alpha, sigma, lam = _logsnr_tables(schedule, grid)
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


def _difference_weights(lam, i, q, h):
    """DPM-Solver's scaled differences D0, D1, D2 (Lu et al. 2022, Alg. 2 and the official
    multistep code) as weights (3, q+1) on the outputs (m_i, m_{i-1}, ..., m_{i-q})."""
    e = np.eye(q + 1)
    d = np.zeros((3, q + 1))
    d[0] = e[0]
    if q >= 1:
        r0 = (lam[i] - lam[i - 1]) / h
        d1_0 = (e[0] - e[1]) / r0
        d[1] = d1_0
    if q == 2:
        r1 = (lam[i - 1] - lam[i - 2]) / h
        d1_1 = (e[1] - e[2]) / r1
        d[1] = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d[2] = (d1_0 - d1_1) / (r0 + r1)
    return d


DPM_SOLVER_TYPES = ("midpoint", "heun", "exact")


def dpm_solver_multistep(schedule, grid, order, form="x0", lower_order_final=False,
                         solver_type="midpoint"):
    """DPM-Solver(++) multistep tables as the official code / diffusers'
    DPMSolverMultistepScheduler compute them (`order` = number of previous outputs, 0-2).

    x0 form (DPM-Solver++): x_{i+1} = sigma_{i+1}/sigma_i x_i + alpha_{i+1} (phi_1 D0 + c1 D1
    + c2 D2) with phi_1 = 1 - e^-h, c2 = 1/2 - (h - phi_1)/h^2 (the third-order step), and c1 =
    phi_1 / 2 for solver_type "midpoint" (Alg. 2, diffusers' default) or 1 - phi_1/h for
    "heun" on second-order steps (third-order steps use 1 - phi_1/h in both). The eps form
    (DPM-Solver) is the same with e^h - 1 and the sign of h flipped, times -sigma_{i+1}.
    "exact" integrates the Lagrange interpolant exactly (`logsnr_multistep`): equal to "heun"
    at second order, and its third-order term has twice the official D2 weight.
    """
    if solver_type not in DPM_SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {DPM_SOLVER_TYPES}, got {solver_type!r}")
    if solver_type == "exact":
        return logsnr_multistep(schedule, grid, order, form, lower_order_final)
    g, alpha, sigma, lam = _logsnr_tables(schedule, grid)
    n = len(g) - 1
    b = np.zeros((n, order + 1))
    for i, q in enumerate(step_orders(n, order, lower_order_final)):
        h = lam[i + 1] - lam[i]
        if form == "x0":
            q = 0 if sigma[i + 1] == 0 else q  # the last step to sigma = 0 gives x0
            hh, scale = -h, -alpha[i + 1]
        else:
            hh, scale = h, -sigma[i + 1]
        phi1 = math.expm1(hh)  # e^{hh} - 1
        if q == 0:
            c = (phi1, 0.0, 0.0)
        else:
            c1 = 0.5 * phi1 if (q == 1 and solver_type == "midpoint") else phi1 / hh - 1.0
            c = (phi1, c1, (phi1 - hh) / hh**2 - 0.5)
        b[i, :q + 1] = scale * np.asarray(c) @ _difference_weights(lam, i, q, h)
    a = (sigma[1:] / sigma[:-1]) if form == "x0" else (alpha[1:] / alpha[:-1])
    return a, b


def _unipc_weights(lam, scale, i, p, form, variant, corrector):
    """Weights of one UniP (or, with `corrector`, UniC) B(h) update from t_i to t_{i+1}
    (Zhao et al. 2023, "UniPC", Alg. 1-2; diffusers' UniPCMultistepScheduler) on the outputs
    (m_{i+1} if corrector, m_i, m_{i-1}, ..., m_{i-p+1}); the x_i term is A_i x_i as always."""
    h = lam[i + 1] - lam[i]
    hh = -h if form == "x0" else h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    rks = np.append((lam[i - np.arange(1, p)] - lam[i]) / h, 1.0)
    rmat = rks[None, :] ** np.arange(p)[:, None]
    rhs, h_phi_k, fact = np.zeros(p), h_phi_1 / hh - 1.0, 1.0
    for j in range(p):  # phi-function moments h phi_{j+2}(hh) (j+1)! / B(h)
        rhs[j] = h_phi_k * fact / b_h
        fact *= j + 2
        h_phi_k = h_phi_k / hh - 1.0 / fact
    off = 1 if corrector else 0
    w = np.zeros(p + off)
    w[off] = -scale * h_phi_1
    diffs = [(np.eye(p + off)[off + k] - np.eye(p + off)[off]) / rks[k - 1] for k in range(1, p)]
    if corrector:
        rhos = np.array([0.5]) if p == 1 else np.linalg.solve(rmat, rhs)
        diffs.append(np.eye(p + 1)[0] - np.eye(p + 1)[1])
    else:
        rhos = np.array([0.5]) if p == 2 else (
            np.linalg.solve(rmat[:-1, :-1], rhs[:-1]) if p > 2 else np.zeros(0))
    for rho_k, d in zip(rhos, diffs):
        w = w - scale * b_h * rho_k * d
    return w


UNIPC_VARIANTS = ("bh1", "bh2")


def unipc(schedule, grid, order=2, form="x0", variant="bh2", lower_order_final=True,
          disable_corrector=()):
    """UniPC tables (A (N,), B (N, order+1)) folded into one linear multistep rule.

    Step i evaluates the model at the predicted x_i, corrects x_i with UniC (order p_{i-1},
    using m_i; skipped at i = 0 and where i-1 is in `disable_corrector`) and predicts x_{i+1}
    with UniP of order p_i = min(order, i+1[, N-i with lower_order_final]), as diffusers'
    UniPCMultistepScheduler. Both updates start from the same corrected x_{i-1}, so the
    correction is a fixed combination of outputs: x_{i+1} = A_i (x_i + K_i m) + P_i m. The
    last prediction is not corrected (no model call after it), so NFE = N. A step to sigma = 0
    (data form only) is first order and returns the data prediction.
    """
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"unipc: variant must be one of {UNIPC_VARIANTS}, got {variant!r}")
    g, alpha, sigma, lam = _logsnr_tables(schedule, grid)
    n = len(g) - 1
    i = np.arange(n)
    p = np.minimum(order, i + 1)
    if lower_order_final:
        p = np.minimum(p, n - i)
    p[sigma[1:] == 0] = 1
    a = (sigma[1:] / sigma[:-1]) if form == "x0" else (alpha[1:] / alpha[:-1])
    scale = alpha[1:] if form == "x0" else sigma[1:]
    b = np.zeros((n, order + 1))
    for k in range(n):
        pred = _unipc_weights(lam, scale[k], k, p[k], form, variant, False)
        b[k, :p[k]] += pred
        if k > 0 and (k - 1) not in disable_corrector:
            q = p[k - 1]
            corr = _unipc_weights(lam, scale[k - 1], k - 1, q, form, variant, True)
            pred_prev = _unipc_weights(lam, scale[k - 1], k - 1, q, form, variant, False)
            corr[1:] -= pred_prev
            b[k, :q + 1] += a[k] * corr
    return a, b


# Butcher tableaux (a, b, c) for rhoRK (DEIS sec. 4, "rhoRK-DEIS"). DEIS's code names them
# "2heun", "3kutta" (its default), "3ral" (Ralston), "3heun", "3vdh" (van der Houwen / Wray),
# "3ssprk" (Shu-Osher SSP) and "4rk"; here without the order digit.
TABLEAUX = {
    "heun": (((), (1.0,)), (0.5, 0.5), (0.0, 1.0)),
    "kutta3": (((), (0.5,), (-1.0, 2.0)), (1 / 6, 2 / 3, 1 / 6), (0.0, 0.5, 1.0)),
    "ral3": (((), (0.5,), (0.0, 0.75)), (2 / 9, 1 / 3, 4 / 9), (0.0, 0.5, 0.75)),
    "heun3": (((), (1 / 3,), (0.0, 2 / 3)), (0.25, 0.0, 0.75), (0.0, 1 / 3, 2 / 3)),
    "vdh3": (((), (8 / 15,), (0.25, 5 / 12)), (0.25, 0.0, 0.75), (0.0, 8 / 15, 2 / 3)),
    "ssprk3": (((), (1.0,), (0.25, 0.25)), (1 / 6, 1 / 6, 2 / 3), (0.0, 1.0, 0.5)),
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
