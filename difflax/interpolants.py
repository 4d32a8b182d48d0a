"""SiT's interpolants, prediction targets and samplers on difflax's schedules and solvers.

Ma et al., "SiT: Exploring Flow and Diffusion-based Generative Models with Scalable
Interpolant Transformers" (ECCV 2024), Sec. 2-3; code willisma/SiT `transport/`. SiT writes
x_t = alpha_t x_* + sigma_t eps with t = 1 data and t = 0 noise; a difflax schedule writes
x_s = alpha(s) x_0 + sigma(s) eps with noise at s = t_max. Each SiT interpolant is therefore
an existing schedule in the flipped time s = 1 - t (SiT Sec. 3; `transport/path.py`):

  "linear"  alpha_t = t, sigma_t = 1 - t                       schedules.rectified_flow()
  "gvp"     alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)     GVP() (vp_cosine with s = 0)
  "vp"      alpha_t = exp(-(1-t)^2 (b1-b0)/4 - (1-t) b0/2)       schedules.vp_linear(0.1, 20)

and SiT's model outputs are difflax parameterisations: "velocity" dx/dt = -dx/ds (difflax
"velocity" with the sign flipped), "noise" = "eps", "score" = "score". So the ODE samplers are
difflax's (`rf_euler`, `rf_heun` on `DiffusionTerm`, Dopri5 via `reference_sample`); the SDE
samplers (SiT Sec. 3, sampler choice: dX = [v + w_t s] dt + sqrt(2 w_t) dW, any w_t >= 0
keeps the marginals)
are one diffrax grid solver here with SiT's choices of the diffusion coefficient w_t.

`sit_fn(x, t) -> output` below is always a model in SiT's convention: x (B, ...), t (B,) SiT
time, the output of kind `prediction` in {"velocity", "noise", "score"}.
"""
from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from difflax import schedules
from difflax.models.sit import SiT
from difflax.parameterization import convert
from difflax.samplers import get_sample_fn, reference_sample, solve
from difflax.samplers.term import AbstractGridSolver

INTERPOLANTS = ("linear", "gvp", "vp")
SIT_PREDICTIONS = {"velocity": "velocity", "noise": "eps", "score": "score"}
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
ODE_METHODS = ("euler", "heun", "dopri5", "tsit5")
SDE_METHODS = ("euler", "heun")
LAST_STEPS = ("mean", "euler", "tweedie")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(repr, choices))}")


@dataclasses.dataclass(frozen=True, eq=False)
class GVP(schedules.AbstractSchedule):
    """SiT's generalised VP path in difflax time: alpha = cos(pi s / 2), sigma = sin(pi s / 2).

    `schedules.vp_cosine(s=0)` is the same path; here the derivatives are written out so
    that d sigma / ds = pi/2 cos(pi s / 2) stays finite at s = 0 (data).
    """

    t_zero = 0.0

    def alpha(self, t):
        return schedules.array_module(t).cos(0.5 * math.pi * schedules.as_time(t))

    def sigma(self, t):
        return schedules.array_module(t).sin(0.5 * math.pi * schedules.as_time(t))

    def d_alpha(self, t):
        return -0.5 * math.pi * self.sigma(t)

    def d_sigma(self, t):
        return 0.5 * math.pi * self.alpha(t)

    def t_from_rho(self, rho):
        return schedules.array_module(rho).arctan(schedules.as_time(rho)) * 2 / math.pi


def interpolant_schedule(interpolant: str) -> schedules.AbstractSchedule:
    """The difflax schedule of a SiT interpolant, in time s = 1 - t (noise at s = 1)."""
    check_choice("interpolant", interpolant, INTERPOLANTS)
    if interpolant == "linear":
        return schedules.rectified_flow()
    if interpolant == "gvp":
        return GVP(t_min=0.0, t_max=1.0)
    return schedules.vp_linear(0.1, 20.0, t_min=1e-5, t_max=1.0)


def default_eps(interpolant: str, prediction: str, *, train: bool) -> float:
    """SiT's `create_transport` defaults: VP 1e-5 (train) / 1e-3 (sample); linear and GVP
    1e-3 for noise and score models, 0 for velocity models."""
    check_choice("interpolant", interpolant, INTERPOLANTS)
    check_choice("prediction", prediction, tuple(SIT_PREDICTIONS))
    if interpolant == "vp":
        return 1e-5 if train else 1e-3
    return 1e-3 if prediction != "velocity" else 0.0


def time_interval(interpolant: str, prediction: str, *, eps: float, sde: bool = False,
                  diffusion_form: str = "sigma", last_step_size: float = 0.0) -> tuple[float, float]:
    """(t0, t1) in SiT time, SiT's `Transport.check_interval`: where training draws t and
    where sampling runs, away from the ends where a model of this kind is singular."""
    t0, t1 = 0.0, 1.0
    if interpolant == "vp":
        t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    elif prediction != "velocity" or sde:
        t0 = eps if (diffusion_form == "SBDM" and sde) or prediction != "velocity" else 0.0
        t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    return t0, t1


def to_difflax_model_fn(sit_fn, prediction: str):
    """(model_fn(x, s), difflax prediction) for difflax's samplers, s = 1 - t.

    A SiT velocity v = dx/dt is -dx/ds; noise and score keep their values.
    """
    check_choice("prediction", prediction, tuple(SIT_PREDICTIONS))
    sign = -1.0 if prediction == "velocity" else 1.0
    return (lambda x, s: sign * sit_fn(x, 1.0 - s)), SIT_PREDICTIONS[prediction]


def get_sit_fn(model, variables, *, y=None, snippet=None, cfg_scale: float = 1.0,
               cfg_channels: int | None = 3):
    """sit_fn(x, t) of a `difflax.models.SiT` with labels y (B,) and/or snippets (B, D).

    With cfg_scale != 1, classifier-free guidance (Ho & Salimans 2022; SiT Sec. 3):
    out = out(null) + cfg_scale (out(cond) - out(null)) on the first `cfg_channels` channels
    (last axis) and out(cond) on the others, both halves in one batched call. The default 3 is
    willisma/SiT's `forward_with_cfg` (its samples keep the conditional half, so the 4th SD
    latent channel is unguided); `cfg_channels=None` guides every channel (standard CFG).
    """
    def plain(x, t):
        return model.apply(variables, x, t, y, snippet)

    if cfg_scale == 1.0:
        return plain

    def guided(x, t):
        b = x.shape[0]
        double = lambda a: None if a is None else jnp.concatenate([a, a])
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype).reshape(-1), (b,))
        drop = jnp.arange(2 * b) >= b
        out = model.apply(variables, double(x), double(t), double(y), double(snippet), drop=drop)
        cond, null = out[:b], out[b:]
        guided = null + cfg_scale * (cond - null)
        if cfg_channels is None:
            return guided
        return jnp.concatenate([guided[..., :cfg_channels], cond[..., cfg_channels:]], axis=-1)

    return guided


def sit_run_fn(model, variables, y=None, snippet=None, *, prediction: str = "velocity"):
    """`SiT.run` as the run function of a feature-reuse plan, in difflax's time s = 1 - t:
    run(x (B', ...), s (B',), **cache) -> (output, stored features), the output converted as
    `to_difflax_model_fn` does (a velocity's sign flipped), labels y (B,) and snippets (B, D)
    tiled to batched decoding (B' = k B). For `difflax.samplers.get_sample_fn(..., plan=,
    graph=model.config.feature_graph(encoder_depth=N))` on `interpolant_schedule(...)`:
    Faster Diffusion's encoder propagation on DiT (Li et al. 2024, Sec. 4: its first blocks
    as the encoder) on SiT. No guidance."""
    check_choice("prediction", prediction, tuple(SIT_PREDICTIONS))
    sign = -1.0 if prediction == "velocity" else 1.0

    def run(x, s, **kwargs):
        tile = lambda a: None if a is None else jnp.tile(
            a, (s.shape[0] // a.shape[0],) + (1,) * (a.ndim - 1))
        out, stored = model.apply(variables, x, 1.0 - s, tile(y), tile(snippet), method=SiT.run,
                                  **kwargs)
        return (None if out is None else sign * out), stored

    return run


# ----------------------------------------------------------------------------
# ODE sampling: difflax's samplers on the interpolant's schedule.


def sample_ode(sit_fn, noise, *, interpolant: str = "linear", prediction: str = "velocity",
               method: str = "heun", steps: int = 50, eps: float | None = None,
               rtol: float = 1e-3, atol: float = 1e-6):
    """Solves the probability-flow ODE from noise (t = t0) to data (t = t1); SiT Sec. 3.

    noise: (B, ...) standard normal; `steps` intervals of a uniform grid in t (SiT's
    num_sampling_steps = steps + 1) for "euler" / "heun" (difflax `rf_euler` / `rf_heun`; Heun
    with a full last step, 2 `steps` NFE, as SiT's torchdiffeq fixed-grid Heun),
    or adaptive "dopri5" / "tsit5" (difflax `reference_sample`, SiT's default). The grid
    methods are built with the one sampling factory, `difflax.samplers.get_sample_fn`. Starts from
    x = sigma(t0) noise, difflax's convention. Returns (samples, nfe); nfe is a Python int
    for the grid methods and the traced number of accepted adaptive steps otherwise.
    """
    check_choice("method", method, ODE_METHODS)
    eps = default_eps(interpolant, prediction, train=False) if eps is None else eps
    t0, t1 = time_interval(interpolant, prediction, eps=eps)
    schedule = interpolant_schedule(interpolant)
    model_fn, kind = to_difflax_model_fn(sit_fn, prediction)
    if method in ("dopri5", "tsit5"):
        return reference_sample(model_fn, noise, schedule=schedule, prediction=kind,
                                t_max=1.0 - t0, t_min=1.0 - t1, solver=method, rtol=rtol,
                                atol=atol)
    grid = 1.0 - np.linspace(t0, t1, steps + 1)
    options = {"final_correction": True} if method == "heun" else {}
    fn, nfe = get_sample_fn(lambda params, labels, skip_scales: model_fn, schedule=schedule,
                            sampler=f"rf_{method}", grid=grid, prediction=kind, **options)
    return fn(None, noise), nfe


# ----------------------------------------------------------------------------
# SDE sampling (SiT Sec. 3 and `transport/integrators.py`).


def diffusion_coefficient(form: str, t, schedule, norm: float = 1.0):
    """SiT's w_t (`compute_diffusion`) at SiT times t (float64 numpy), for `schedule`.

    "constant" norm; "SBDM" norm * sigma^2 (dlog sigma - dlog alpha) (score-based diffusion's
    own diffusion, g^2 / 2); "sigma" norm * sigma_t; "linear" norm (1 - t); "decreasing"
    (norm cos(pi t) + 1)^2 / 4; "increasing-decreasing" norm sin(pi t)^2.
    """
    check_choice("diffusion_form", form, DIFFUSION_FORMS)
    t = np.asarray(t, np.float64)
    s = 1.0 - t
    if form == "constant":
        return np.full_like(t, norm)
    if form == "SBDM":
        a, sg = np.asarray(schedule.alpha(s)), np.asarray(schedule.sigma(s))
        with np.errstate(divide="ignore", invalid="ignore"):
            w = sg * np.asarray(schedule.d_sigma(s)) - sg**2 * np.asarray(schedule.d_alpha(s)) / a
        return norm * np.where(sg == 0, 0.0, w)
    if form == "sigma":
        return norm * np.asarray(schedule.sigma(s))
    if form == "linear":
        return norm * (1.0 - t)
    if form == "decreasing":
        return 0.25 * (norm * np.cos(np.pi * t) + 1) ** 2
    return norm * np.sin(np.pi * t) ** 2


class InterpolantSDE(AbstractGridSolver):
    """Euler-Maruyama or SiT's stochastic Heun on the reverse SDE in difflax time s.

    With u = dx/ds the probability-flow velocity and w the diffusion coefficient, a step of
    h = s_{i+1} - s_i < 0 is x + (u - w score) h + sqrt(2 w) sqrt(-h) z (SiT's SDE with
    dt = -h). Heun adds the noise first, then averages the drift at both ends (SiT's
    `__Heun_step`). Tables: times (N+1,), w (N+1,), noise (N,) = sqrt(2 w) (0 on the
    deterministic last step), mode (N,): 0 an SDE step, 1 the SDE drift only ("mean"),
    2 the probability-flow drift only ("euler"), 3 Tweedie's E[x_0 | x] ("tweedie").
    """

    times: jax.Array
    w: jax.Array
    noise: jax.Array
    mode: jax.Array
    key: jax.Array
    heun: bool = eqx.field(static=True)

    def _outputs(self, term, t, x):
        """(u, score, x0) of the model at (t, x) from one model call."""
        out = term.predict(t, x, term.prediction)
        s = term.schedule
        t = jnp.asarray(t, x.dtype)
        coeffs = (s.alpha(t), s.sigma(t), s.d_alpha(t), s.d_sigma(t))
        return tuple(convert(out, term.prediction, kind, x, *coeffs)
                     for kind in ("velocity", "score", "x0"))

    def _drift(self, term, i, x):
        u, score, _ = self._outputs(term, self.times[i], x)
        return u - self.w[i] * score

    def _step(self, term, i, x, state):
        t0, t1 = self.times[i], self.times[i + 1]
        h = t1 - t0
        z = jax.random.normal(jax.random.fold_in(self.key, i), x.shape, x.dtype)

        def sde_step(x):
            if not self.heun:
                return x + h * self._drift(term, i, x) + self.noise[i] * jnp.sqrt(-h) * z
            xhat = x + self.noise[i] * jnp.sqrt(-h) * z
            k1 = self._drift(term, i, xhat)
            return xhat + 0.5 * h * (k1 + self._drift(term, i + 1, xhat + h * k1))

        def drift_step(x):
            return x + h * self._drift(term, i, x)

        def ode_step(x):
            return x + h * self._outputs(term, t0, x)[0]

        def tweedie(x):
            return self._outputs(term, t0, x)[2]

        return jax.lax.switch(self.mode[i], (sde_step, drift_step, ode_step, tweedie), x).astype(x.dtype), state


def sample_sde(sit_fn, noise, *, key, interpolant: str = "linear", prediction: str = "velocity",
               method: str = "euler", steps: int = 250, diffusion_form: str = "sigma",
               diffusion_norm: float = 1.0, last_step: str | None = "mean",
               last_step_size: float = 0.04, eps: float | None = None):
    """Samples the SDE dX = [v + w_t s] dt + sqrt(2 w_t) dW (SiT Sec. 3) from noise to data.

    SiT's `sample_sde`: `steps` stochastic steps on a uniform grid from t0 to
    1 - last_step_size (SiT's num_sampling_steps = steps + 1), then one last step to t = 1:
    "mean" (the SDE drift, no noise), "euler" (the ODE drift) or "tweedie" (E[x_* | x]).
    w_t = `diffusion_coefficient(diffusion_form, t, ...)` (default SiT's "sigma"); "SBDM"
    starts at t0 >= 1e-3, where its w_t is finite.
    noise: (B, ...) standard normal; key: the Brownian increments, step i from
    fold_in(key, i). Returns (samples, nfe) with nfe a Python int.
    """
    check_choice("method", method, SDE_METHODS)
    check_choice("last_step", last_step, LAST_STEPS + (None,))
    eps = default_eps(interpolant, prediction, train=False) if eps is None else eps
    if diffusion_form == "SBDM" and eps == 0:
        eps = 1e-3  # SBDM's w_t = sigma^2 dlog(sigma / alpha) is infinite at pure noise
    size = last_step_size if last_step else 0.0
    t0, t1 = time_interval(interpolant, prediction, eps=eps, sde=True,
                           diffusion_form=diffusion_form, last_step_size=size)
    schedule = interpolant_schedule(interpolant)
    t = np.linspace(t0, t1, steps + 1)
    mode = np.zeros(steps, np.int32)
    if last_step:
        t = np.append(t, 1.0)
        mode = np.append(mode, {"mean": 1, "euler": 2, "tweedie": 3}[last_step])
    w = diffusion_coefficient(diffusion_form, t, schedule, diffusion_norm)
    noise_scale = np.where(mode == 0, np.sqrt(2 * np.maximum(w[:-1], 0)), 0.0)
    dtype = jnp.asarray(noise).dtype
    solver = InterpolantSDE(times=jnp.asarray(1.0 - t, dtype), w=jnp.asarray(w, dtype),
                            noise=jnp.asarray(noise_scale, dtype), mode=jnp.asarray(mode),
                            key=key, heun=method == "heun")
    model_fn, kind = to_difflax_model_fn(sit_fn, prediction)
    out = solve(model_fn, noise, schedule=schedule, solver=solver, grid=1.0 - t, prediction=kind)
    nfe = steps * (2 if method == "heun" else 1) + (1 if last_step else 0)
    return out, nfe
