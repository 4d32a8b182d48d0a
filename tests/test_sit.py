"""SiT: golden output of willisma/SiT, presets, guidance and snippets; interpolants, samplers
and loss against exact Gaussian answers."""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import data
from difflax.interpolants import (INTERPOLANTS, diffusion_coefficient, get_sit_fn,
                                  interpolant_schedule, sample_ode, sample_sde, time_interval,
                                  default_eps)
from difflax.models.sit import SiT, SiTConfig, init_sit, sit_config, snippet_dropout
from difflax.training.interpolant_loss import repa_loss
from difflax.models.sit_weights import convert_sit_state_dict, load_sit
from difflax.training import (TrainConfig, create_train_state, ema_decay, get_train_step_fn,
                              make_mesh, make_optimizer, replicated)
from difflax.training.interpolant_loss import get_interpolant_loss_fn, interpolant_loss

# willisma/SiT's own network with random weights (tests/data/README.md); the larger golden of
# the project's shared folder is an optional extra check, skipped where it is absent.
GOLDEN = pathlib.Path(__file__).resolve().parent / "data" / "sit_small.npz"
LARGER = pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden" / "sit_tiny_cond8.npz"
TINY = SiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                 num_classes=10, class_dropout_prob=0.1, snippet_dim=6, learn_sigma=False,
                 repa_depth=1, repa_dim=5, repa_hidden=16)


def _golden(path=GOLDEN):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("path", [GOLDEN, pytest.param(LARGER, marks=pytest.mark.skipif(
    not LARGER.exists(), reason="optional larger golden sit_tiny_cond8.npz is not here "
    "(../shared/golden is not part of the repository; tests/data/sit_small.npz is the check)"))],
    ids=lambda p: p.stem)
def test_state_dict_reproduces_sit_output(path):
    data_ = _golden(path)
    model, variables = load_sit(path)
    assert model.config == SiTConfig(**json.loads(str(data_["config_json"])))
    x = jnp.asarray(data_["input/x_nchw"]).transpose(0, 2, 3, 1)
    out = jax.jit(model.apply)(variables, x, data_["input/t"], data_["input/y"])
    ref = data_["output/nchw"].transpose(0, 2, 3, 1)
    assert out.shape == ref.shape  # learn_sigma: the first in_channels of 2 * in_channels
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_converter_names_what_does_not_fit():
    state = {k.removeprefix("param/"): v for k, v in _golden().items() if k.startswith("param/")}
    with pytest.raises(ValueError, match="missing.*blocks_2"):
        load_sit(GOLDEN, depth=3)
    del state["blocks.0.attn.qkv.bias"]
    with pytest.raises(ValueError, match="missing.*blocks_0/attn/qkv/bias"):
        convert_sit_state_dict(state, sit_config("SiT-S/2", input_size=8, in_channels=4,
                                                 hidden_size=48, depth=2, num_heads=4,
                                                 num_classes=10))


def test_presets_match_the_paper_and_bad_configs_name_valid_choices():
    # DiT / SiT Table 1: SiT-XL/2 has 675M parameters at 256x256 (32x32x4 latents).
    xl = sit_config("SiT-XL/2", input_size=32)
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.patch_size) == (28, 1152, 16, 2)
    shapes = jax.eval_shape(lambda: init_sit(xl, jax.random.key(0)))
    assert round(sum(x.size for x in jax.tree.leaves(shapes)) / 1e6) == 675
    with pytest.raises(ValueError, match="SiT-XL/2"):
        sit_config("SiT-M/2")
    with pytest.raises(ValueError, match=r"valid patch sizes: \[1, 2, 3, 6\]"):
        SiTConfig(input_size=6, patch_size=4, hidden_size=32, num_heads=2)
    with pytest.raises(ValueError, match="num_heads"):
        SiTConfig(hidden_size=36, num_heads=5)
    with pytest.raises(ValueError, match="shape"):
        SiT(TINY).init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), jnp.ones(1))


@pytest.fixture(scope="module")
def tiny():
    """A tiny labels + snippets SiT with random weights everywhere (zero-init layers matter);
    shapes from eval_shape, values from numpy: nothing to compile."""
    shapes = jax.eval_shape(lambda: init_sit(TINY, jax.random.key(0)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)
    return SiT(TINY), variables, jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)


class _Affine:
    """A stand-in network (no compile): out = x * (1 + t) + 2 [not dropped], 4 channels."""

    def apply(self, variables, x, t, y, snippet, drop=None):
        keep = 1.0 if drop is None else 1.0 - drop[:, None, None, None]
        return x * (1 + t[:, None, None, None]) + 2.0 * keep


def test_guidance_on_three_channels_as_sit():
    x, t = jnp.ones((2, 2, 2, 4)), jnp.array([0.5, 1.0])
    cond = x * (1 + t[:, None, None, None]) + 2.0
    null = cond - 2.0
    sit3 = get_sit_fn(_Affine(), {}, y=jnp.array([1, 2]), cfg_scale=4.0)(x, t)
    every = get_sit_fn(_Affine(), {}, y=jnp.array([1, 2]), cfg_scale=4.0, cfg_channels=None)(x, t)
    np.testing.assert_allclose(sit3[..., :3], null[..., :3] + 8.0)  # null + 4 (cond - null)
    np.testing.assert_allclose(sit3[..., 3], cond[..., 3])  # the 4th channel: conditional
    np.testing.assert_allclose(every, null + 8.0)


def test_guidance_combines_conditional_and_null_outputs(tiny):
    model, v, x = tiny
    t, y = jnp.array([0.1, 0.4, 0.6, 0.9]), jnp.array([0, 3, 5, 9])
    snip = jax.random.normal(jax.random.key(3), (4, 6))
    # training: labels dropped per sample (p = 0.1), snippets element-wise (p = 0.4), 256 copies
    xs, ts = jnp.repeat(x[:1], 256, 0), jnp.full((256,), 0.5)
    ys, sn = jnp.full((256,), 3), jnp.repeat(snip[:1], 256, 0)

    @jax.jit
    def outputs(v):
        apply = functools.partial(model.apply, v)
        return dict(
            cond=apply(x, t, y, snip), null=apply(x, t, None, None),
            dropped=apply(x, t, y, snip, drop=jnp.ones(4, bool)),
            guided=get_sit_fn(model, v, y=y, snippet=snip, cfg_scale=3.0)(x, t),
            plain=get_sit_fn(model, v, y=y, snippet=snip)(x, t),
            trained=apply(xs, ts, ys, sn, train=True, rngs={"dropout": jax.random.key(4)}),
            no_snip=apply(xs, ts, ys, None))

    o = outputs(v)
    np.testing.assert_allclose(o["dropped"], o["null"], atol=1e-6)
    assert float(jnp.abs(o["cond"] - o["null"]).min()) > 0  # the condition reaches every output
    # Tolerance from float32 error: guidance runs cond and null as one batch of 8, these were
    # batches of 4, so each may differ by the network's rounding, taken as up to 64 eps of the
    # output scale (a depth-2 transformer accumulates far less; an actual error in the
    # formula moves the result by a fraction of |cond - null|, checked below to be far larger).
    # null + s (cond - null) amplifies those errors by |s| + |1 - s| = 5 where it cancels.
    eps = float(np.finfo(np.float32).eps)
    net_err = 64 * eps * float(jnp.maximum(jnp.abs(o["cond"]).max(), jnp.abs(o["null"]).max()))
    tol = (3.0 + 2.0) * net_err
    np.testing.assert_allclose(o["guided"], o["null"] + 3.0 * (o["cond"] - o["null"]), atol=tol,
                               rtol=4 * eps)
    assert 0.02 * float(jnp.abs(o["cond"] - o["null"]).max()) > tol  # a 2% error in s would fail
    np.testing.assert_allclose(o["plain"], o["cond"], atol=1e-6)
    # GMem's element-wise snippet dropout (p = 0.4): a row loses its whole snippet only with
    # probability 0.4^6; whole-snippet dropout would make ~40% of the rows snippet-free
    dropped = np.asarray(jnp.all(jnp.abs(o["trained"] - o["no_snip"]) < 1e-6, axis=(1, 2, 3)))
    assert dropped.sum() < 5
    # the null condition is the zero snippet through the projection: its bias matters
    bias = v["params"]["snippet_embedder"]["bias"]
    moved = jax.tree.map(lambda a: a, v)
    moved["params"]["snippet_embedder"]["bias"] = bias + 1.0
    np.testing.assert_allclose(o["null"], model.apply(v, x, t, None, jnp.zeros((4, 6))), rtol=1e-5)
    assert float(jnp.abs(model.apply(moved, x, t, None, None) - o["null"]).max()) > 1e-3


def test_snippet_dropout_is_elementwise_with_rescaling():
    snip = jnp.ones((64, 100))
    out = np.asarray(snippet_dropout(jax.random.key(0), snip, 0.4))
    kept = out[out != 0]
    np.testing.assert_allclose(kept, np.full_like(kept, 1 / 0.6), rtol=1e-6)  # kept: 1 / (1 - p)
    assert abs(np.mean(out == 0) - 0.4) < 0.02
    assert 0 < np.mean(out == 0, axis=1).min() and np.mean(out == 0, axis=1).max() < 1


# ----------------------------------------------------------------------------
# Interpolants and samplers against a Gaussian's exact flow.

MEAN, STD = jnp.array([[1.5, -0.5]]), 0.4
GAUSS = data.GaussianMixture(means=MEAN, stds=jnp.array([STD]), weights=jnp.array([1.0]))


def exact_sit_fn(interpolant, prediction, mixture=GAUSS):
    """The exact SiT-convention model of a mixture: velocity, noise or score at (x, t)."""
    sch = interpolant_schedule(interpolant)

    def fn(x, t):
        s = 1.0 - t
        a, sg, da, ds = (f(s)[:, None] for f in (sch.alpha, sch.sigma, sch.d_alpha, sch.d_sigma))
        score = jax.vmap(mixture.score)(x, a[:, 0], sg[:, 0])
        if prediction == "score":
            return score
        eps = -sg * score
        if prediction == "noise":
            return eps
        x0 = jax.vmap(mixture.posterior_mean)(x, a[:, 0], sg[:, 0])
        return -(da * x0 + ds * eps)  # dx/dt = -dx/ds

    return fn


def exact_endpoint(interpolant, prediction, noise):
    """The probability-flow map of a Gaussian is affine: x_s = a m + sqrt(a^2 std^2 + s^2) z."""
    sch = interpolant_schedule(interpolant)
    t0, t1 = time_interval(interpolant, prediction, eps=default_eps(interpolant, prediction,
                                                                    train=False))
    a0, s0, a1, s1 = (float(f(1 - t)) for t in (t0, t1) for f in (sch.alpha, sch.sigma))
    z = (s0 * noise - a0 * MEAN) / np.sqrt(a0**2 * STD**2 + s0**2)
    return a1 * MEAN + np.sqrt(a1**2 * STD**2 + s1**2) * z


NOISE = jax.random.normal(jax.random.key(0), (256, 2))


def test_ode_euler_and_heun_converge_at_their_orders():
    fn = exact_sit_fn("linear", "velocity")
    exact = exact_endpoint("linear", "velocity", NOISE)
    run = jax.jit(lambda z, m, n: sample_ode(fn, z, method=m, steps=n), static_argnums=(1, 2))
    out = {(m, n): run(NOISE, m, n) for m in ("euler", "heun") for n in (10, 20)}
    err = {k: float(jnp.sqrt(jnp.mean((x - exact) ** 2))) for k, (x, _) in out.items()}
    assert 1.8 < err["euler", 10] / err["euler", 20] < 2.2   # order 1
    assert 3.3 < err["heun", 10] / err["heun", 20] < 4.5     # order 2 (3.44 at 10 -> 20 steps)
    assert int(out["heun", 10][1]) == 20  # a full Heun last step, as SiT's torchdiffeq grid
    # torchdiffeq's Heun on the same grid, by hand: every step x + h (k1 + k2) / 2
    x, ts = NOISE, np.linspace(0.0, 1.0, 11)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        k1 = fn(x, jnp.full((256,), t0))
        k2 = fn(x + (t1 - t0) * k1, jnp.full((256,), t1))
        x = x + (t1 - t0) * (k1 + k2) / 2
    np.testing.assert_allclose(out["heun", 10][0], x, atol=1e-5)


@pytest.mark.parametrize("interpolant,prediction", [("gvp", "noise"), ("vp", "score")])
def test_dopri5_reaches_the_exact_endpoint(interpolant, prediction):
    fn = exact_sit_fn(interpolant, prediction)
    out, _ = jax.jit(lambda z: sample_ode(fn, z, interpolant=interpolant, prediction=prediction,
                                          method="dopri5", rtol=1e-6))(NOISE)
    np.testing.assert_allclose(out, exact_endpoint(interpolant, prediction, NOISE), atol=1e-4)


@pytest.mark.parametrize("interpolant,prediction,form,method,last", [
    ("linear", "velocity", "sigma", "euler", "mean"),
    ("gvp", "noise", "SBDM", "heun", "tweedie")])
def test_sde_samples_have_the_data_moments(interpolant, prediction, form, method, last):
    z = jax.random.normal(jax.random.key(5), (4000, 2))
    fn = exact_sit_fn(interpolant, prediction)
    out, nfe = jax.jit(lambda z: sample_sde(fn, z, key=jax.random.key(6), interpolant=interpolant,
                                            prediction=prediction, method=method, steps=60,
                                            diffusion_form=form, last_step=last))(z)
    assert nfe == (60 if method == "euler" else 120) + 1
    np.testing.assert_allclose(out.mean(0), MEAN[0], atol=0.04)  # 4000 samples: se 0.006
    np.testing.assert_allclose(out.std(0), STD, atol=0.03)


def test_diffusion_coefficients():
    t = np.array([0.25, 0.5])
    lin = interpolant_schedule("linear")
    np.testing.assert_allclose(diffusion_coefficient("sigma", t, lin, 2.0), 2 * (1 - t))
    np.testing.assert_allclose(diffusion_coefficient("linear", t, lin), 1 - t)
    np.testing.assert_allclose(diffusion_coefficient("increasing-decreasing", t, lin), [0.5, 1])
    # SBDM for the linear path: sigma^2 dlog(sigma/alpha)/ds = (1 - t) / t (SiT's drift_var)
    np.testing.assert_allclose(diffusion_coefficient("SBDM", t, lin), (1 - t) / t)
    with pytest.raises(ValueError, match="'SBDM'"):
        diffusion_coefficient("cosine", t, lin)


@pytest.mark.parametrize("interpolant", INTERPOLANTS)
def test_loss_targets_vanish_for_the_exact_model_of_a_point_mass(interpolant):
    # For data at one point c, E[target | x_t] is the target itself: the exact model has loss 0.
    c = jnp.array([[0.7, -1.2]])
    point = data.GaussianMixture(means=c, stds=jnp.zeros(1), weights=jnp.ones(1))
    x = jnp.repeat(c, 64, 0)
    for prediction in ("velocity", "noise", "score"):
        fn = exact_sit_fn(interpolant, prediction, point)
        for weight in (None, "likelihood") if prediction != "velocity" else (None,):
            loss = interpolant_loss(fn, x, key=jax.random.key(7), interpolant=interpolant,
                                    prediction=prediction, loss_weight=weight)
            wrong = interpolant_loss(lambda x, t: 1.01 * fn(x, t), x, key=jax.random.key(7),
                                     interpolant=interpolant, prediction=prediction,
                                     loss_weight=weight)
            assert float(loss) < 1e-6 * float(wrong) + 1e-9, (prediction, weight)


def test_repa_projection_and_alignment_loss(tiny):
    model, v, x = tiny
    out, z = jax.jit(lambda v: model.apply(v, x, 0.5, jnp.arange(4), return_repa=True))(v)
    assert out.shape == x.shape and z.shape == (4, 16, 5)  # 16 tokens, repa_dim 5
    np.testing.assert_allclose(repa_loss(z, 3.0 * z), -1.0, atol=1e-6)
    np.testing.assert_allclose(repa_loss(z, -z), 1.0, atol=1e-6)
    e = jnp.eye(5)
    np.testing.assert_allclose(repa_loss(e[None, :1], e[1:2]), 0.0, atol=1e-7)  # (B, D) target
    with pytest.raises(ValueError, match="repa_depth"):
        SiTConfig(hidden_size=32, num_heads=2, depth=2, repa_dim=4, repa_depth=3)


def test_train_steps_reduce_the_loss_with_snippets(tiny):
    model, variables, _ = tiny  # random weights: only the train step is compiled
    mesh = make_mesh(jax.devices()[:1])
    cfg = TrainConfig(lr=3e-3, warmup_steps=0, ema_decay=0.9)
    tx = make_optimizer(cfg)
    # placed as the step returns it (replicated on the mesh), so that it compiles once
    state = jax.device_put(create_train_state(variables["params"], tx), replicated(mesh))
    loss_fn = get_interpolant_loss_fn(model, repa_weight=0.1)  # with REPA targets last
    step = get_train_step_fn(loss_fn, tx, lambda s: ema_decay(cfg, s), mesh)
    # one image, so that the exact velocity is learnable and the loss can fall towards 0
    x = jnp.sign(jax.random.normal(jax.random.key(9), (1, 8, 8, 1))).repeat(16, 0)
    batch = (x, jnp.arange(16) % 10, jnp.eye(16, 6), jnp.ones((16, 5)))
    losses = []
    for _ in range(40):
        state, m = step(state, batch, jax.random.key(8))
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
