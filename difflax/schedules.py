"""Noise schedules and time grids.

Every schedule describes x_t = alpha(t) x_0 + sigma(t) eps in its own time variable t, with
rho(t) = sigma / alpha (DEIS's rho, Zhang & Chen 2023 eq. 13) and log-SNR
lambda(t) = log(alpha / sigma) = -log rho. Sampling runs from `t_max` (noise) down to `t_min`.

Methods work on Python floats, numpy arrays (float64 host tables) and jax arrays alike.

References: DDPM (Ho et al. 2020) betas; score_sde (Song et al. 2021) VP / VE SDEs;
improved DDPM (Nichol & Dhariwal 2021) cosine; EDM (Karras et al. 2022) eq. 5 grid;
DEIS (Zhang & Chen 2023) quadratic grid; rectified flow (Liu et al. 2023).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def array_module(*xs):
    """jax.numpy if any argument is a jax.Array (traced or not), else numpy: schedules are
    evaluated in float64 on the host for coefficient tables and in JAX under jit."""
    return jnp if any(isinstance(x, jax.Array) for x in xs) else np


def as_time(t):
    """A jax.Array unchanged, anything else as a float64 numpy array."""
    return t if isinstance(t, jax.Array) else np.asarray(t, np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class AbstractSchedule:
    """x_t = alpha(t) x_0 + sigma(t) eps for t in [t_min, t_max]; noise at t_max.

    `t_zero` is the time where sigma = 0 (a grid may end there), or None.
    """

    t_min: float
    t_max: float

    t_zero = None

    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def d_alpha(self, t):
        """d alpha / dt."""
        raise NotImplementedError

    def d_sigma(self, t):
        """d sigma / dt."""
        raise NotImplementedError

    def t_from_rho(self, rho):
        """Inverse of rho(t) = sigma(t) / alpha(t) (rho is increasing in t)."""
        raise NotImplementedError

    def rho(self, t):
        return self.sigma(t) / self.alpha(t)

    def log_snr(self, t):
        return array_module(t).log(self.alpha(t) / self.sigma(t))

    def t_from_log_snr(self, lam):
        return self.t_from_rho(array_module(lam).exp(-as_time(lam)))

    def breakpoints(self) -> np.ndarray:
        """Times where alpha, sigma are not smooth (for piecewise quadrature)."""
        return np.zeros((0,))

    def valid_range(self) -> tuple[float, float]:
        lo = self.t_min if self.t_zero is None else min(self.t_zero, self.t_min)
        return lo, self.t_max


class _VP(AbstractSchedule):
    """Variance preserving: sigma = sqrt(1 - alpha^2)."""

    def sigma(self, t):  # sqrt(1 - alpha^2) without cancellation at small t
        t = as_time(t)
        return array_module(t).sqrt(-array_module(t).expm1(2.0 * self._log_alpha(t)))

    def d_sigma(self, t):
        t = as_time(t)
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def rho(self, t):  # sqrt(1/alpha^2 - 1) = sqrt(expm1(-2 log alpha)), accurate at small t
        t = as_time(t)
        return array_module(t).sqrt(array_module(t).expm1(-2.0 * self._log_alpha(t)))

    def t_from_rho(self, rho):
        rho = as_time(rho)
        return self._t_from_log_alpha(-0.5 * array_module(rho).log1p(rho**2))

    def alpha(self, t):
        t = as_time(t)
        return array_module(t).exp(self._log_alpha(t))


@dataclasses.dataclass(frozen=True, eq=False)
class VPDiscrete(_VP):
    """DDPM's discrete schedule: alpha_bar_n = prod_{m<=n} (1 - beta_m), n = 0..N-1.

    Time is the network's step index t in [0, N-1]. Between integer steps, `interpolation`
    "log_alpha" (default) is linear in log alpha (as DPM-Solver's discrete wrapper, so log-SNR
    is smooth within a step); "alpha_bar" is linear in alpha_bar = alpha^2, as DEIS's code
    (`DiscreteVPSDE`). Values at integer steps are the same; the exact DEIS coefficients
    (tAB's integral in t) differ. With `with_t_zero`, time -1 has alpha_bar = 1 (sigma = 0):
    `t_zero = -1`, where diffusers' DPM-Solver / UniPC schedulers end (final_sigmas_type
    "zero"); between -1 and 0 the same interpolation applies.
    """

    log_alpha_table: np.ndarray = None  # (N,) float64, log sqrt(alpha_bar_n)
    interpolation: str = "log_alpha"
    with_t_zero: bool = False

    @property
    def t_zero(self):
        return -1.0 if self.with_t_zero else None

    def _nodes(self):
        """(times, log alpha) of the interpolation nodes: 0..N-1, and -1 (log alpha 0)
        first with `with_t_zero`."""
        table = self.log_alpha_table
        if self.with_t_zero:
            return np.arange(-1.0, len(table)), np.concatenate([[0.0], table])
        return np.arange(float(len(table))), table

    def _log_alpha(self, t):
        xp = array_module(t)
        times, table = self._nodes()
        if self.interpolation == "alpha_bar":
            return 0.5 * xp.log(xp.interp(t, xp.asarray(times), xp.asarray(np.exp(2 * table))))
        return xp.interp(t, xp.asarray(times), xp.asarray(table))

    def d_alpha(self, t):
        t = as_time(t)
        xp = array_module(t)
        times, table = self._nodes()
        idx = xp.clip(xp.floor(t - times[0]).astype(int), 0, len(times) - 2)
        if self.interpolation == "alpha_bar":  # d sqrt(alpha_bar) = d alpha_bar / (2 alpha)
            slopes = xp.asarray(np.diff(np.exp(2 * table)))
            return slopes[idx] / (2 * self.alpha(t))
        slopes = xp.asarray(np.diff(table))
        return self.alpha(t) * slopes[idx]

    def _t_from_log_alpha(self, la):
        xp = array_module(la)
        times, table = self._nodes()
        # log alpha (and alpha_bar) is decreasing in t: interpolate on the reversed table.
        if self.interpolation == "alpha_bar":
            return xp.interp(-xp.exp(2 * la), -xp.asarray(np.exp(2 * table)), xp.asarray(times))
        return xp.interp(-la, -xp.asarray(table), xp.asarray(times))

    def breakpoints(self):
        return self._nodes()[0]


@dataclasses.dataclass(frozen=True, eq=False)
class VPLinear(_VP):
    """score_sde's VP SDE: beta(t) = beta_min + t (beta_max - beta_min), t in [t_min, 1]."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def _log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def d_alpha(self, t):
        t = as_time(t)
        return -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min)) * self.alpha(t)

    def _t_from_log_alpha(self, la):
        xp = array_module(la)
        db = self.beta_max - self.beta_min
        return (-self.beta_min + xp.sqrt(self.beta_min**2 - 4.0 * db * la)) / db


@dataclasses.dataclass(frozen=True, eq=False)
class VPCosine(_VP):
    """Improved DDPM's cosine schedule: alpha(t) = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2)."""

    s: float = 0.008

    def _theta(self, t):
        return (t + self.s) / (1.0 + self.s) * math.pi / 2

    def _log_alpha(self, t):
        # log(cos(theta0 + d) / cos(theta0)) = log1p(-2 sin^2(d/2) - tan(theta0) sin(d))
        xp = array_module(t)
        d = t / (1.0 + self.s) * math.pi / 2
        return xp.log1p(-2 * xp.sin(d / 2) ** 2 - math.tan(self._theta(0.0)) * xp.sin(d))

    def d_alpha(self, t):
        t = as_time(t)
        xp = array_module(t)
        c0 = math.cos(self._theta(0.0))
        return -xp.sin(self._theta(t)) * math.pi / (2 * (1 + self.s)) / c0

    def _t_from_log_alpha(self, la):
        xp = array_module(la)
        c = xp.exp(la) * math.cos(self._theta(0.0))
        return xp.arccos(c) * 2 * (1 + self.s) / math.pi - self.s


@dataclasses.dataclass(frozen=True, eq=False)
class VE(AbstractSchedule):
    """score_sde's VE SDE: alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def alpha(self, t):
        return array_module(t).ones_like(as_time(t))

    def sigma(self, t):
        t = as_time(t)
        return self.sigma_min * array_module(t).exp(t * math.log(self.sigma_max / self.sigma_min))

    def d_alpha(self, t):
        return array_module(t).zeros_like(as_time(t))

    def d_sigma(self, t):
        return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)

    def t_from_rho(self, rho):
        return array_module(rho).log(as_time(rho) / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)


@dataclasses.dataclass(frozen=True, eq=False)
class EDM(AbstractSchedule):
    """EDM (Karras et al. 2022): alpha = 1, sigma(t) = t; a grid may end at t = 0."""

    t_zero = 0.0

    def alpha(self, t):
        return array_module(t).ones_like(as_time(t))

    def sigma(self, t):
        return as_time(t) * 1.0

    def d_alpha(self, t):
        return array_module(t).zeros_like(as_time(t))

    def d_sigma(self, t):
        return array_module(t).ones_like(as_time(t))

    def t_from_rho(self, rho):
        return as_time(rho) * 1.0


@dataclasses.dataclass(frozen=True, eq=False)
class RectifiedFlow(AbstractSchedule):
    """Rectified flow: x_t = (1 - t) x_0 + t z, noise at t = 1, data at t = 0."""

    t_zero = 0.0

    def alpha(self, t):
        return 1.0 - as_time(t)

    def sigma(self, t):
        return as_time(t) * 1.0

    def d_alpha(self, t):
        return -array_module(t).ones_like(as_time(t))

    def d_sigma(self, t):
        return array_module(t).ones_like(as_time(t))

    def t_from_rho(self, rho):
        rho = as_time(rho)
        return rho / (1.0 + rho)


# ----------------------------------------------------------------------------
# Public constructors.


def ddpm_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """DDPM's linear betas (Ho et al. 2020), float64 (num_steps,)."""
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def scaled_linear_betas(num_steps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012):
    """Stable Diffusion's scaled-linear betas: linear in sqrt(beta)."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2


VP_INTERPOLATIONS = ("log_alpha", "alpha_bar")


def vp_discrete(betas="linear", *, interpolation="log_alpha",
                with_t_zero: bool = False) -> VPDiscrete:
    """Discrete VP from `betas` (array, or "linear" = DDPM, "scaled_linear" = Stable Diffusion).

    Time t is the step index in [0, N-1]; `interpolation` between steps: "log_alpha" or
    DEIS's "alpha_bar"; `with_t_zero`: time -1 with sigma = 0 (see `VPDiscrete`).
    """
    if interpolation not in VP_INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of "
                         f"{VP_INTERPOLATIONS}")
    if isinstance(betas, str):
        makers = {"linear": ddpm_betas, "scaled_linear": scaled_linear_betas}
        if betas not in makers:
            raise ValueError(f"unknown betas {betas!r}; choose one of {sorted(makers)} or an array")
        betas = makers[betas]()
    betas = np.asarray(betas, np.float64)
    log_alpha = 0.5 * np.cumsum(np.log1p(-betas))
    return VPDiscrete(t_min=0.0, t_max=float(len(betas) - 1), log_alpha_table=log_alpha,
                      interpolation=interpolation, with_t_zero=with_t_zero)


def vp_linear(beta_min: float = 0.1, beta_max: float = 20.0, *, t_min: float = 1e-3,
              t_max: float = 1.0) -> VPLinear:
    """score_sde's continuous VP SDE with linear beta(t), t in [t_min, t_max]."""
    return VPLinear(t_min=t_min, t_max=t_max, beta_min=beta_min, beta_max=beta_max)


def vp_cosine(s: float = 0.008, *, t_min: float = 1e-3, t_max: float = 0.9946) -> VPCosine:
    """Cosine VP; t_max < 1 because alpha(1) = 0 (DPM-Solver uses 0.9946)."""
    return VPCosine(t_min=t_min, t_max=t_max, s=s)


def ve(sigma_min: float = 0.01, sigma_max: float = 50.0) -> VE:
    """score_sde's VE SDE, t in [0, 1]."""
    return VE(t_min=0.0, t_max=1.0, sigma_min=sigma_min, sigma_max=sigma_max)


def edm(sigma_min: float = 0.002, sigma_max: float = 80.0) -> EDM:
    """EDM: time = sigma in [sigma_min, sigma_max]; grids may append t = 0."""
    return EDM(t_min=sigma_min, t_max=sigma_max)


def rectified_flow(*, t_min: float = 0.0, t_max: float = 1.0) -> RectifiedFlow:
    """Rectified flow, noise at t = 1 (alpha = 0, so rho-space samplers need t_max < 1)."""
    return RectifiedFlow(t_min=t_min, t_max=t_max)


# ----------------------------------------------------------------------------
# Time grids.

GRID_KINDS = ("uniform", "quadratic", "power", "logsnr", "edm")


def time_grid(schedule: AbstractSchedule, steps: int, kind: str = "uniform", *,
              kappa: float | None = None, t_min: float | None = None,
              t_max: float | None = None, final_zero: bool = False) -> np.ndarray:
    """A decreasing float64 grid of `steps + 1` times from t_max to t_min.

    kind: "uniform" in t; "quadratic" / "power" uniform in t^(1/kappa) (kappa = 2 default for
    "quadratic": DEIS sec. 5's quadratic grid); "logsnr" uniform in log-SNR (DPM-Solver);
    "edm" uniform in rho^(1/kappa), kappa = 7 (Karras et al. 2022 eq. 5). With `final_zero`,
    the grid has `steps` such points and a last time `schedule.t_zero` (sigma = 0), as EDM.
    """
    if kind not in GRID_KINDS:
        raise ValueError(f"unknown grid kind {kind!r}; choose one of {GRID_KINDS}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    lo = schedule.t_min if t_min is None else t_min
    hi = schedule.t_max if t_max is None else t_max
    n = steps if final_zero else steps + 1
    if final_zero and schedule.t_zero is None:
        raise ValueError(f"{type(schedule).__name__} has no time with sigma = 0")
    if final_zero and n < 2:
        return np.array([hi, schedule.t_zero], np.float64)
    else:
        s = np.linspace(0.0, 1.0, n)
        if kind == "uniform":
            pts = hi + s * (lo - hi)
        elif kind in ("quadratic", "power"):
            k = kappa if kappa is not None else 2.0
            pts = (hi ** (1 / k) + s * (lo ** (1 / k) - hi ** (1 / k))) ** k
        else:
            with np.errstate(divide="ignore"):
                r_hi, r_lo = float(schedule.rho(hi)), float(schedule.rho(lo))
            if not (np.isfinite(r_hi) and r_lo > 0):
                raise ValueError(f"grid kind {kind!r} needs 0 < rho < inf at both ends; pass "
                                 "t_min / t_max inside the schedule's range")
            if kind == "logsnr":
                rho = np.exp(np.log(r_hi) + s * (np.log(r_lo) - np.log(r_hi)))
            else:
                k = kappa if kappa is not None else 7.0
                rho = (r_hi ** (1 / k) + s * (r_lo ** (1 / k) - r_hi ** (1 / k))) ** k
            pts = np.asarray(schedule.t_from_rho(rho), np.float64)
        pts[0], pts[-1] = hi, lo  # exact end points
    if final_zero:
        pts = np.append(pts, schedule.t_zero)
    return np.asarray(pts, np.float64)


def deis_integer_grid(schedule: VPDiscrete, steps: int, kind: str = "quadratic") -> np.ndarray:
    """DEIS's grid for a discrete VP schedule (its `get_rev_timesteps`): `steps` + 1 integer
    times, uniform ("uniform") or uniform in sqrt(t) ("quadratic") from 0 to N-1, each rounded
    down; repeated times are dropped and the smallest unused integers fill their places.
    Decreasing float64, for `sample(..., grid=...)`."""
    if not isinstance(schedule, VPDiscrete):
        raise ValueError(f"deis_integer_grid needs a VPDiscrete schedule, got "
                         f"{type(schedule).__name__}")
    if kind not in ("uniform", "quadratic"):
        raise ValueError(f"deis_integer_grid: kind must be 'uniform' or 'quadratic', got {kind!r}")
    t_end = len(schedule.log_alpha_table) - 1
    if not 1 <= steps <= t_end:
        raise ValueError(f"deis_integer_grid: steps must be in [1, {t_end}], got {steps}")
    pts = (np.linspace(0, t_end, steps + 1) if kind == "uniform"
           else np.linspace(0, math.sqrt(t_end), steps + 1) ** 2).astype(int)
    pts = np.unique(pts)
    unused = np.setdiff1d(np.arange(t_end), pts)[:steps + 1 - len(pts)]
    return np.sort(np.concatenate([pts, unused]))[::-1].astype(np.float64)


def check_grid(schedule: AbstractSchedule, grid) -> np.ndarray:
    """Validates a user grid: concrete, 1-D, strictly decreasing, inside the schedule's range."""
    try:
        g = np.asarray(grid, np.float64)
    except jax.errors.TracerArrayConversionError:
        raise ValueError("grid must be concrete (numpy or a list), not a traced array: "
                         "sampler coefficients are computed on the host") from None
    if g.ndim != 1 or len(g) < 2:
        raise ValueError(f"grid must be 1-D with at least 2 times, got shape {g.shape}")
    if not np.all(np.diff(g) < 0):
        raise ValueError("grid must be strictly decreasing (from noise at t_max to data)")
    lo, hi = schedule.valid_range()
    tol = 1e-9 * max(1.0, abs(hi))
    if g[0] > hi + tol or g[-1] < lo - tol:
        raise ValueError(f"grid [{g[0]}, ..., {g[-1]}] leaves the schedule's range [{lo}, {hi}]")
    return g
