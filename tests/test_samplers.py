"""Samplers on a Gaussian mixture with an exact denoiser: convergence order against a tight
Tsit5 reference, exact identities between samplers, NFE counts, jit / vmap, and errors.

Runs in float64 (jax.enable_x64 inside each test) so that errors of high-order methods stay
far above round-off; dims and batch are tiny to keep compile and run time small.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import parameterization as P
from difflax import schedules as S
from difflax.data import gmm
from difflax.samplers import SAMPLERS, coefficients, make_solver, reference_sample, sample

MIX = gmm(2, 3, seed=1, spread=1.0, std=0.6)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def exact_model(schedule, kind="x0"):
    """The ideal model of the mixture in parameterisation `kind`, time t of shape (B,)."""

    def model(x, t):
        def one(xi, ti):
            a, s = schedule.alpha(ti), schedule.sigma(ti)
            x0 = MIX.posterior_mean(xi, a, s)
            return P.from_x0_eps(x0, (xi - a * x0) / s, kind, a, s, schedule.d_alpha(ti),
                                 schedule.d_sigma(ti))

        return jax.vmap(one)(x, t)

    return model


VP, EDM, RF = S.vp_linear(), S.edm(), S.rectified_flow(t_min=1e-3)
MODELS = {id(s): exact_model(s) for s in (VP, EDM, RF)}


def noise(b=4):
    return jax.random.normal(jax.random.key(0), (b, 2), jnp.float64)


@functools.lru_cache(maxsize=None)
def reference(sched_name):
    s = {"vp": VP, "edm": EDM, "rf": RF}[sched_name]
    with jax.enable_x64(True):
        x, _ = reference_sample(MODELS[id(s)], noise(), schedule=s, prediction="x0",
                                rtol=1e-11, atol=1e-11, max_steps=8192)
    return np.asarray(x)


CALLS = []
COUNTING = {}
for _s in (VP, EDM, RF):
    def _counting(x, t, _m=MODELS[id(_s)]):
        jax.debug.callback(lambda: CALLS.append(1))
        return _m(x, t)
    COUNTING[id(_s)] = _counting


def error(sched_name, sampler, steps, **opts):
    """RMS error against the reference; also checks the returned NFE against real calls."""
    s = {"vp": VP, "edm": EDM, "rf": RF}[sched_name]
    CALLS.clear()
    x, nfe = sample(COUNTING[id(s)], noise(), schedule=s, sampler=sampler, steps=steps,
                    prediction="x0", **opts)
    x = np.asarray(jax.block_until_ready(x))
    assert nfe == len(CALLS) and isinstance(nfe, int)
    return float(np.sqrt(np.mean((x - reference(sched_name)) ** 2))), nfe


# (schedule, sampler, options, steps, theoretical order). Step counts sit in the asymptotic
# regime of each method; slopes are fitted over the three.
MS = (32, 64, 128)  # multistep methods: one compilation per (history length, steps)
RK = (8, 16, 32)
CONVERGENCE = [
    ("vp", "ddim", {}, MS, 1),
    ("vp", "deis_tab", dict(order=2), MS, 3),
    ("vp", "deis_tab", dict(order=3), MS, 4),
    ("vp", "deis_rhoab", dict(order=2), MS, 3),
    ("vp", "dpmpp_2m", {}, MS, 2),
    # the official 3M's D2 weight is half the exact integral's: local error O(h^3), so it is
    # second order asymptotically (measured slopes 1.6, 1.9 over 128-256-512 steps)
    ("vp", "dpmpp_3m", {}, (128, 256, 512), 2),
    ("vp", "dpmpp_3m", dict(solver_type="exact"), MS, 3),
    ("vp", "unipc", dict(lower_order_final=False), MS, 3),
    ("vp", "unipc", dict(variant="bh1", lower_order_final=False), MS, 3),
    ("vp", "unipc", dict(order=3, lower_order_final=False), MS, 4),
    ("vp", "deis_rhork", dict(method="heun"), RK, 2),
    ("vp", "deis_rhork", dict(method="kutta3"), (16, 32, 64), 3),
    ("vp", "deis_rhork", dict(method="ral3"), (16, 32, 64), 3),
    ("vp", "deis_rhork", dict(method="heun3"), (16, 32, 64), 3),
    ("vp", "deis_rhork", dict(method="vdh3"), (16, 32, 64), 3),
    ("vp", "deis_rhork", dict(method="ssprk3"), (16, 32, 64), 3),
    ("vp", "deis_rhork", dict(method="rk4"), RK, 4),
    ("edm", "edm_heun", {}, RK, 2),
    ("edm", "deis_rhoab", dict(order=3), MS, 4),
    ("rf", "rf_euler", {}, RK, 1),
    ("rf", "rf_heun", {}, RK, 2),
]


@pytest.mark.parametrize("sched,sampler,opts,steps,order", CONVERGENCE,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CONVERGENCE])
def test_convergence_order(sched, sampler, opts, steps, order):
    errs, nfes = zip(*[error(sched, sampler, n, **opts) for n in steps])
    errs = np.array(errs)
    stages = len(coefficients.TABLEAUX[opts["method"]][1]) if "method" in opts else 1
    # EDM's grid ends at sigma = 0 (no correction there); the RF grid here ends at t = 1e-3
    expected_nfe = {"edm_heun": lambda n: 2 * n - 1, "rf_heun": lambda n: 2 * n}.get(
        sampler, lambda n: stages * n)
    assert list(nfes) == [expected_nfe(n) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert slope >= order - 0.6, (errs, slope)
    assert errs[-1] < 5e-2


def test_ipndm_on_an_explicit_grid_uniform_in_rho():
    # Fixed Adams-Bashforth weights assume equal steps in rho (EDM's time is rho). The
    # lower-order warm start (an Euler first step, local error O(h^2)) caps the global order
    # at 2 asymptotically, whatever the AB order; higher orders lower the constant.
    steps = (8, 16, 32)
    ref, _ = reference_sample(MODELS[id(EDM)], noise(), schedule=EDM, prediction="x0",
                              t_max=3.0, t_min=1.0, rtol=1e-12, atol=1e-12)
    errs = []
    for n in steps:
        x, nfe = sample(MODELS[id(EDM)], noise(), schedule=EDM, sampler="ipndm", order=4,
                        grid=np.linspace(3.0, 1.0, n + 1), prediction="x0")
        errs.append(float(np.sqrt(np.mean((np.asarray(x) - np.asarray(ref)) ** 2))))
        assert nfe == n
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert slope >= 2.0, errs


def test_ddim_equals_tab0_and_euler_and_rf_euler():
    m = COUNTING[id(VP)]
    x_ddim, _ = sample(m, noise(), schedule=VP, sampler="ddim", steps=32, prediction="x0")
    x_tab0, _ = sample(m, noise(), schedule=VP, sampler="deis_tab", steps=32, order=0,
                       prediction="x0")
    x_euler, _ = sample(m, noise(), schedule=VP, sampler="euler", steps=32, prediction="x0")
    np.testing.assert_allclose(x_tab0, x_ddim, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(x_euler, x_ddim)
    # rectified flow from t = 1 exactly: DDIM in the data form = Euler on the velocity
    m = COUNTING[id(RF)]
    a, _ = sample(m, noise(), schedule=RF, sampler="ddim", steps=8, prediction="x0")
    b, _ = sample(m, noise(), schedule=RF, sampler="rf_euler", steps=8, prediction="x0")
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_deis_logrho_equals_dpm_solver_2m_eps_form():
    # log-rho AB with a degree-1 (two-point) polynomial = DPM-Solver-2M (order 2), noise form;
    # quadrature (DEIS) against closed form (DPM-Solver).
    for s in (VP, S.vp_discrete(), S.vp_cosine()):
        g = S.time_grid(s, 9, "logsnr")
        a1, b1 = coefficients.eps_multistep(s, g, 2, "logrho")
        a2, b2 = coefficients.logsnr_multistep(s, g, 2, "eps")
        np.testing.assert_allclose(b1, b2, rtol=1e-11, atol=1e-13)
        np.testing.assert_array_equal(a1, a2)
    kw = dict(schedule=VP, steps=9, prediction="x0")
    x1, _ = sample(MODELS[id(VP)], noise(), sampler="deis_logrho", order=1, **kw)
    x2, _ = sample(MODELS[id(VP)], noise(), sampler="dpm_multistep", order=2, form="eps",
                   lower_order_final=False, solver_type="exact", **kw)
    np.testing.assert_allclose(x1, x2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("s", [S.vp_linear(), S.vp_discrete(interpolation="alpha_bar")],
                         ids=["vp_linear", "vp_discrete_alpha_bar"])
def test_quadrature_beats_riemann_sum(s):
    # tAB's integral in t of l_j(t) d rho / dt (DEIS eq. 15) by scipy, with the schedule's own
    # derivatives; for DEIS's alpha_bar-linear VP discrete schedule this also checks that
    # d_alpha and t_from_rho agree with its alpha between integer steps.
    from scipy import integrate

    g = S.time_grid(s, 6, "quadratic")
    _, b = coefficients.eps_multistep(s, g, 3, "t")
    i, nodes = 4, g[1:5][::-1]
    kinks = [k for k in s.breakpoints() if g[i + 1] < k < g[i]]
    for j in range(4):
        f = lambda t: coefficients.lagrange_basis(nodes, t)[j] * (
            s.d_sigma(t) / s.alpha(t) - s.sigma(t) * s.d_alpha(t) / s.alpha(t) ** 2)
        exact = integrate.quad(f, g[i + 1], g[i], epsabs=1e-14, epsrel=1e-13,
                               points=kinks or None, limit=500)[0]
        assert abs(b[i, j] / s.alpha(g[i + 1]) + exact) < 1e-10 * max(1, abs(exact))


def test_deis_integer_grid_and_interpolation():
    s = S.vp_discrete(interpolation="alpha_bar")
    g = S.deis_integer_grid(s, 10)
    np.testing.assert_array_equal(g, np.floor(np.linspace(0, np.sqrt(999), 11) ** 2)[::-1])
    g = S.deis_integer_grid(s, 50)  # floors repeat near 0: the smallest unused integers fill
    assert len(np.unique(g)) == 51 and np.all(g == np.round(g)) and np.all(np.diff(g) < 0)
    assert set(np.floor(np.linspace(0, np.sqrt(999), 51) ** 2)) <= set(g)
    np.testing.assert_array_equal(S.deis_integer_grid(s, 4, "uniform"), [999, 749, 499, 249, 0])
    # the two interpolations agree at integer steps and differ in between
    t = np.array([3.0, 3.5, 700.0, 700.5])
    d = S.vp_discrete().alpha(t) - s.alpha(t)
    assert max(abs(d[0]), abs(d[2])) < 1e-15 and abs(d[1]) > 1e-10 and abs(d[3]) > 1e-7
    with pytest.raises(ValueError, match="alpha_bar"):
        S.vp_discrete(interpolation="linear")


def test_ipndm_default_grid_is_uniform_in_t_on_vp():
    from difflax.samplers import make_grid

    np.testing.assert_allclose(make_grid(VP, "ipndm", 4), np.linspace(1.0, 1e-3, 5))
    np.testing.assert_allclose(make_grid(VP, "deis_tab", 2),
                               [1.0, ((1 + 1e-3 ** 0.5) / 2) ** 2, 1e-3])


def test_edm_heun_equals_rhork_heun_without_final_zero():
    g = S.time_grid(EDM, 8, "edm")
    kw = dict(schedule=EDM, grid=g, prediction="x0")
    x1, n1 = sample(COUNTING[id(EDM)], noise(), sampler="edm_heun", **kw)
    x2, n2 = sample(COUNTING[id(EDM)], noise(), sampler="deis_rhork", method="heun", **kw)
    np.testing.assert_allclose(x1, x2, rtol=1e-12, atol=1e-12)
    assert n1 == n2 == 16


NFE = [  # the convergence tests check every other sampler's count
    ("ipndm", {}, 6), ("deis_tab", dict(order=3), 6), ("edm_heun", dict(s_churn=10.0), 11),
    ("euler_maruyama", {}, 6),
]


@pytest.mark.parametrize("sampler,opts,expected", NFE, ids=[f"{n[0]}-{n[1]}" for n in NFE])
def test_nfe_counts(sampler, opts, expected):
    CALLS.clear()
    x, nfe = sample(COUNTING[id(EDM)], noise(), schedule=EDM, sampler=sampler, steps=6,
                    prediction="x0", key=jax.random.key(3), **opts)
    jax.block_until_ready(x)
    assert nfe == expected == len(CALLS) and isinstance(nfe, int)
    assert np.all(np.isfinite(x))


def test_jit_and_vmap_match_eager_and_loop():
    model = COUNTING[id(EDM)]
    kw = dict(schedule=EDM, sampler="deis_rhoab", order=3, steps=32, prediction="x0")
    eager, _ = sample(model, noise(), **kw)
    jitted = jax.jit(lambda z: sample(model, z, **kw)[0])(noise())
    np.testing.assert_allclose(jitted, eager, rtol=1e-12, atol=1e-12)
    zs = jax.random.normal(jax.random.key(1), (3, 4, 2), jnp.float64)
    keys = jax.random.split(jax.random.key(2), 3)
    model = MODELS[id(EDM)]
    kw = dict(schedule=EDM, sampler="edm_heun", steps=4, prediction="x0", s_churn=5.0)
    batched = jax.vmap(lambda z, k: sample(model, z, key=k, **kw)[0])(zs, keys)
    looped = jnp.stack([sample(model, z, key=k, **kw)[0] for z, k in zip(zs, keys)])
    np.testing.assert_allclose(batched, looped, rtol=1e-10, atol=1e-10)


def test_any_prediction_feeds_any_sampler():
    from difflax.samplers import DiffusionTerm

    x, t = noise(), jnp.asarray(0.3)
    preds = {k: DiffusionTerm(exact_model(VP, k), VP, k).predict(t, x, "eps")
             for k in P.PREDICTIONS}
    for kind in P.PREDICTIONS:
        np.testing.assert_allclose(preds[kind], preds["x0"], rtol=1e-9, atol=1e-9)
    kw = dict(schedule=VP, sampler="deis_tab", order=2, steps=32)
    a, _ = sample(exact_model(VP, "v"), noise(), prediction="v", **kw)
    b, _ = sample(COUNTING[id(VP)], noise(), prediction="x0", **kw)
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-8)


def test_parameterization_round_trip():
    x0, eps = jax.random.normal(jax.random.key(0), (2, 3, 4), jnp.float64)
    a, s, da, ds = 0.8, 0.6, -0.3, 0.4
    x = a * x0 + s * eps
    for kind in P.PREDICTIONS:
        out = P.from_x0_eps(x0, eps, kind, a, s, da, ds)
        r0, re = P.to_x0_eps(out, kind, x, a, s, da, ds)
        np.testing.assert_allclose(r0, x0, atol=1e-12)
        np.testing.assert_allclose(re, eps, atol=1e-12)
        for other in P.PREDICTIONS:
            np.testing.assert_allclose(P.convert(out, kind, other, x, a, s, da, ds),
                                       P.from_x0_eps(x0, eps, other, a, s, da, ds), atol=1e-12)


def test_euler_maruyama_samples_a_gaussian():
    # one-component "mixture": the data distribution is N(mu, 0.6^2) per coordinate
    from difflax.data import GaussianMixture

    g = GaussianMixture(means=jnp.array([[1.0, -0.5]]), stds=jnp.array([0.6]),
                        weights=jnp.array([1.0]))
    model = lambda x, t: jax.vmap(lambda xi, ti: g.posterior_mean(
        xi, VP.alpha(ti), VP.sigma(ti)))(x, t)
    z = jax.random.normal(jax.random.key(0), (4000, 2), jnp.float64)
    x, nfe = sample(model, z, schedule=VP, sampler="euler_maruyama", steps=200,
                    prediction="x0", key=jax.random.key(1), grid_kind="uniform")
    assert nfe == 200
    np.testing.assert_allclose(np.mean(x, 0), [1.0, -0.5], atol=0.05)
    np.testing.assert_allclose(np.std(x, 0), [0.6, 0.6], atol=0.05)


def test_bad_input_raises_value_error():
    model = MODELS[id(VP)]
    kw = dict(schedule=VP, prediction="x0")
    with pytest.raises(ValueError, match="ddim"):
        sample(model, noise(), sampler="nope", steps=4, **kw)
    with pytest.raises(ValueError, match="at least 4 steps"):
        sample(model, noise(), sampler="deis_tab", order=3, steps=2, **kw)
    with pytest.raises(ValueError, match=r"\(0, 1, 2, 3\)"):
        sample(model, noise(), sampler="deis_tab", order=4, steps=8, **kw)
    with pytest.raises(ValueError, match="ssprk3"):
        sample(model, noise(), sampler="deis_rhork", method="rk5", steps=8, **kw)
    with pytest.raises(ValueError, match="midpoint"):
        sample(model, noise(), sampler="dpmpp_2m", solver_type="taylor", steps=8, **kw)
    with pytest.raises(ValueError, match="bh2"):
        sample(model, noise(), sampler="unipc", variant="bh3", steps=8, **kw)
    with pytest.raises(ValueError, match="decreasing"):
        sample(model, noise(), sampler="ddim", grid=[0.1, 0.5, 1.0], **kw)
    with pytest.raises(ValueError, match="range"):
        sample(model, noise(), sampler="ddim", grid=[2.0, 0.5, 0.01], **kw)
    with pytest.raises(ValueError, match="valid options"):
        sample(model, noise(), sampler="ddim", steps=4, order=2, **kw)
    with pytest.raises(ValueError, match="key"):
        sample(model, noise(), sampler="euler_maruyama", steps=4, **kw)
    with pytest.raises(ValueError, match="alpha > 0"):
        sample(model, noise(), schedule=S.rectified_flow(), sampler="deis_tab", steps=4,
               prediction="x0")
    assert "dpmpp_3m" in SAMPLERS and make_solver(VP, "ddim", [1.0, 0.5, 0.01])[1] == 2


# ---------------------------------------------------------------------------------------------
# DPM-Solver++ and UniPC against diffusers' schedulers: the same discrete VP schedule, grid,
# model (the mixture's exact eps) and initial sample; float64 sigmas on both sides.


def diffusers_run(scheduler_cls, steps, **config):
    """(difflax schedule, grid, final sample) of diffusers' scheduler with its default
    timesteps and final_sigmas_type="sigma_min" (difflax's VP discrete grid ends at t = 0)."""
    import torch

    sched = scheduler_cls(final_sigmas_type="sigma_min", **config)
    sched.set_timesteps(steps)
    acp = sched.alphas_cumprod.double().numpy()
    schedule = S.VPDiscrete(t_min=0.0, t_max=999.0, log_alpha_table=0.5 * np.log(acp))
    grid = np.append(sched.timesteps.numpy(), 0).astype(np.float64)
    sched.sigmas = torch.from_numpy(np.asarray(schedule.rho(grid)))  # float64, same values
    model = exact_model(schedule, "eps")
    x = torch.from_numpy(float(schedule.sigma(grid[0])) * np.asarray(noise()))
    for t in sched.timesteps:
        eps = model(jnp.asarray(x.numpy()), jnp.full((x.shape[0],), float(t)))
        x = sched.step(torch.from_numpy(np.array(eps)), t, x).prev_sample
    return schedule, grid, x.numpy()


def difflax_run(schedule, grid, sampler, **opts):
    x, nfe = sample(exact_model(schedule, "eps"), noise(), schedule=schedule, sampler=sampler,
                    grid=grid, prediction="eps", **opts)
    assert nfe == len(grid) - 1
    return np.asarray(x)


# (difflax sampler, its default options, diffusers config, an alternative variant that must
# differ from diffusers' default, steps). DPM at 6 and 20 steps: below / above its
# lower_order_final threshold of 15; UniPC's lower_order_final does not depend on the count.
DIFFUSERS = [
    ("dpmpp_2m", {}, dict(solver_order=2), dict(solver_type="heun"), 6),
    ("dpmpp_2m", {}, dict(solver_order=2), dict(solver_type="heun"), 20),
    ("dpmpp_3m", {}, dict(solver_order=3), dict(solver_type="exact"), 6),
    ("dpmpp_3m", {}, dict(solver_order=3), dict(solver_type="exact"), 20),
    ("dpm_multistep", dict(form="eps"), dict(algorithm_type="dpmsolver"),
     dict(form="eps", solver_type="heun"), 6),
    ("dpm_multistep", dict(form="eps", order=3), dict(algorithm_type="dpmsolver", solver_order=3),
     dict(form="eps", order=3, solver_type="exact"), 20),
    ("unipc", {}, {}, dict(variant="bh1"), 8),
    ("unipc", dict(variant="bh1"), dict(solver_type="bh1"), dict(variant="bh2"), 8),
    ("unipc", dict(order=3), dict(solver_order=3), dict(order=3, disable_corrector=(2,)), 8),
    ("unipc", dict(form="eps"), dict(predict_x0=False), dict(form="eps", variant="bh1"), 8),
]


@pytest.mark.parametrize("sampler,opts,config,other,steps", DIFFUSERS,
                         ids=[f"{d[0]}-{d[1]}-{d[4]}" for d in DIFFUSERS])
def test_matches_diffusers(sampler, opts, config, other, steps):
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    cls = UniPCMultistepScheduler if sampler == "unipc" else DPMSolverMultistepScheduler
    schedule, grid, ref = diffusers_run(cls, steps, **config)
    x = difflax_run(schedule, grid, sampler, **opts)
    # diffusers' DPM-Solver casts the sample to float32 inside each step
    tol = 1e-5 if cls is DPMSolverMultistepScheduler else 1e-10
    np.testing.assert_allclose(x, ref, rtol=tol, atol=tol)
    y = difflax_run(schedule, grid, sampler, **other)
    assert np.max(np.abs(y - ref)) > 100 * tol
