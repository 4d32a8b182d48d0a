"""Schedules and time grids: identities, inverses, derivatives, grid shapes and errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import schedules as S

SCHEDULES = {
    "vp_discrete": S.vp_discrete(),
    "vp_scaled_linear": S.vp_discrete("scaled_linear"),
    "vp_discrete_alpha_bar": S.vp_discrete(interpolation="alpha_bar"),  # DEIS's interpolation
    "vp_linear": S.vp_linear(),
    "vp_cosine": S.vp_cosine(),
    "ve": S.ve(),
    "edm": S.edm(),
    "rectified_flow": S.rectified_flow(t_min=1e-3, t_max=0.999),
}


def _ts(s, n=57):
    return np.linspace(s.t_min, s.t_max, n)


@pytest.mark.parametrize("name", SCHEDULES)
def test_rho_inverse_and_log_snr(name):
    s = SCHEDULES[name]
    t = _ts(s)
    rho = s.rho(t)
    assert np.all(np.diff(rho) > 0)
    np.testing.assert_allclose(s.t_from_rho(rho), t, rtol=1e-9, atol=1e-9 * s.t_max)
    np.testing.assert_allclose(s.log_snr(t), -np.log(rho), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.t_from_log_snr(s.log_snr(t)), t, rtol=1e-9, atol=1e-9 * s.t_max)
    np.testing.assert_allclose(rho, s.sigma(t) / s.alpha(t), rtol=1e-10)


@pytest.mark.parametrize("name", SCHEDULES)
def test_derivatives_match_finite_differences(name):
    s = SCHEDULES[name]
    t = _ts(s)[1:-1] + 0.37 * (s.t_max - s.t_min) / 56  # off the discrete schedule's kinks
    e = 1e-6 * s.t_max
    np.testing.assert_allclose(s.d_alpha(t), (s.alpha(t + e) - s.alpha(t - e)) / (2 * e),
                               rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(s.d_sigma(t), (s.sigma(t + e) - s.sigma(t - e)) / (2 * e),
                               rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", SCHEDULES)
def test_jax_and_numpy_agree(name):
    s = SCHEDULES[name]
    t = _ts(s, 9)
    for fn in ("alpha", "sigma", "rho", "d_alpha", "d_sigma"):
        np.testing.assert_allclose(np.asarray(getattr(s, fn)(jnp.asarray(t, jnp.float32))),
                                   getattr(s, fn)(t), rtol=2e-4, atol=1e-6)
    jitted = jax.jit(lambda t: s.alpha(t))(jnp.float32(t[3]))
    np.testing.assert_allclose(jitted, s.alpha(t[3]), rtol=1e-5)


def test_vp_identities():
    for name in ("vp_discrete", "vp_linear", "vp_cosine"):
        s = SCHEDULES[name]
        t = _ts(s)
        np.testing.assert_allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, 1.0, rtol=1e-12)
    d = S.vp_discrete()
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(d.alpha(np.arange(1000.0)) ** 2, abar, rtol=1e-12)
    sl = S.vp_discrete("scaled_linear")
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(sl.alpha(999.0) ** 2, np.prod(1 - betas), rtol=1e-12)
    lin = S.vp_linear()
    np.testing.assert_allclose(lin.alpha(1.0), np.exp(-0.25 * 19.9 - 0.05), rtol=1e-12)
    cos = S.vp_cosine()
    assert abs(cos.alpha(0.0) - 1.0) < 1e-12
    ve, edm, rf = S.ve(), S.edm(), S.rectified_flow()
    assert ve.sigma(0.0) == pytest.approx(0.01) and ve.sigma(1.0) == pytest.approx(50.0)
    assert edm.sigma(3.0) == 3.0 and edm.alpha(3.0) == 1.0
    assert rf.alpha(0.25) == 0.75 and rf.sigma(0.25) == 0.25


@pytest.mark.parametrize("interpolation", ["log_alpha", "alpha_bar"])
def test_vp_discrete_t_zero(interpolation):
    """with_t_zero adds time -1 with sigma = 0 below step 0 and changes nothing at t >= 0."""
    plain = S.vp_discrete("scaled_linear", interpolation=interpolation)
    s = S.vp_discrete("scaled_linear", interpolation=interpolation, with_t_zero=True)
    t = np.array([0.0, 0.3, 1.0, 500.5, 999.0])
    for f in ("alpha", "sigma", "d_alpha"):
        np.testing.assert_array_equal(getattr(s, f)(t), getattr(plain, f)(t))
    assert plain.t_zero is None and s.t_zero == -1.0 and s.valid_range() == (-1.0, 999.0)
    assert s.sigma(-1.0) == 0.0 and s.alpha(-1.0) == 1.0 and s.t_from_rho(0.0) == -1.0
    np.testing.assert_allclose(s.t_from_rho(s.rho(np.array([-0.5, 0.0, 2.5]))), [-0.5, 0.0, 2.5],
                               atol=1e-9)
    np.testing.assert_allclose(s.alpha(-0.5) ** 2, (1 + (1 - 0.00085)) / 2 if
                               interpolation == "alpha_bar" else np.sqrt(1 - 0.00085), rtol=1e-12)


@pytest.mark.parametrize("kind", ["uniform", "quadratic", "logsnr", "edm"])
@pytest.mark.parametrize("name", ["vp_linear", "edm", "vp_discrete"])
def test_time_grid(kind, name):
    s = SCHEDULES[name]
    g = S.time_grid(s, 7, kind)
    assert g.shape == (8,) and g.dtype == np.float64
    assert g[0] == s.t_max and g[-1] == s.t_min and np.all(np.diff(g) < 0)
    if kind == "uniform":
        np.testing.assert_allclose(np.diff(g), np.diff(g)[0])
    if kind == "quadratic":
        np.testing.assert_allclose(np.diff(np.sqrt(g)), np.diff(np.sqrt(g))[0])
    if kind == "logsnr":
        lam = s.log_snr(g)
        np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-7)
    if kind == "edm":
        r = s.rho(g) ** (1 / 7)
        np.testing.assert_allclose(np.diff(r), np.diff(r)[0], rtol=1e-7)


def test_edm_grid_is_karras_eq5_with_final_zero():
    s, n = S.edm(), 18
    g = S.time_grid(s, n, "edm", final_zero=True)
    i = np.arange(n)
    eq5 = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(g[:-1], eq5, rtol=1e-12)
    assert g[-1] == 0.0 and len(g) == n + 1


def test_grid_errors():
    s = S.vp_linear()
    with pytest.raises(ValueError, match="uniform"):
        S.time_grid(s, 5, "cosine")
    with pytest.raises(ValueError, match="decreasing"):
        S.check_grid(s, [0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match="range"):
        S.check_grid(s, [1.5, 0.5, 0.01])
    with pytest.raises(ValueError, match="range"):
        S.check_grid(s, [1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="sigma = 0"):
        S.time_grid(s, 5, final_zero=True)
    with pytest.raises(ValueError, match="rho"):
        S.time_grid(S.rectified_flow(), 5, "logsnr")
    np.testing.assert_array_equal(S.check_grid(S.edm(), [80.0, 1.0, 0.0]), [80.0, 1.0, 0.0])
