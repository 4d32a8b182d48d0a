"""A-SDM model assembly (difflax.accel.asdm): ME-CondConv, GRI attention, UNet surgery,
inheritance, switching."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax.accel import asdm
from difflax.accel.asdm import CondConv2d, GRIConfig, clme_experts, gri_attention
from difflax.models import Denoiser, Surgery, ddpmpp
from difflax.models.layers import Conv2d, Init
from difflax.models.unet_block import UNetBlock
from difflax.training.loop import get_init_params_fn

# enc.8x8_block0, enc.4x4_down, enc.4x4_block0 (attn), dec.4x4_in0 (attn), dec.4x4_in1,
# dec.4x4_block0, dec.4x4_block1 (attn), dec.8x8_up, dec.8x8_block0, dec.8x8_block1
NET = ddpmpp(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=8,
             channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)
DROP = ("enc.4x4_block0", "dec.4x4_in1", "dec.8x8_block0")
X = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
LABELS = jnp.arange(4)


def _random_like(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)


def _init(denoiser, seed=0):
    """Random parameters of the right shapes (compiling a UNet's init takes a minute)."""
    return _random_like(jax.eval_shape(
        get_init_params_fn(denoiser, jax.random.key(0))), seed)


@pytest.fixture(scope="module")
def teacher():
    return Denoiser(net=NET), _init(Denoiser(net=NET))


STORE = ("enc.4x4_down", "dec.4x4_in0", "dec.4x4_in1", "dec.8x8_block1")


@pytest.fixture(scope="module")
def run_fn():
    """(D(X; sigma), {node: (h, aux)} for STORE): one compilation per model, shared."""
    return jax.jit(lambda d, p, sigma: d.apply({"params": p}, X, jnp.full(4, sigma), LABELS,
                                               method=Denoiser.run, store=STORE),
                   static_argnums=0)


# ---------------------------------------------------------------------------- ME-CondConv


def _with(variables, **params):
    return {"params": {**variables["params"], **params}}


@pytest.mark.parametrize("impl", ["experts", "vmap"])
def test_condconv_with_one_expert_is_a_convolution(impl):
    x = jax.random.normal(jax.random.key(0), (3, 6, 6, 5))
    emb = jax.random.normal(jax.random.key(1), (3, 7))
    layer = CondConv2d(4, num_experts=1, impl=impl)
    v = _random_like(jax.eval_shape(layer.init, jax.random.key(2), x, emb))
    conv = {"params": {"weight": v["params"]["experts"][0], "bias": v["params"]["bias"][0]}}
    expected = Conv2d(4, 3).apply(conv, x)
    v = _with(v, route_bias=jnp.full((1,), 40.0))  # a = sigmoid(40) = 1 in float32
    np.testing.assert_allclose(layer.apply(v, x, emb), expected, rtol=1e-5, atol=1e-5)


def test_condconv_mixes_experts_per_sample():
    """y_b = sum_i a_bi (W_i * x_b + b_i), a = sigmoid(GAP(x) R + emb R_e + r), both impls."""
    x = jax.random.normal(jax.random.key(0), (3, 6, 6, 5))
    emb = jax.random.normal(jax.random.key(1), (3, 7))
    v = CondConv2d(4, num_experts=3).init(jax.random.key(2), x, emb)
    p = v["params"]
    np.testing.assert_allclose(jax.nn.sigmoid(p["route_bias"]), 1 / 3, rtol=1e-6)  # mean at init
    r, re = (jax.random.normal(jax.random.key(k), s) for k, s in ((3, (5, 3)), (4, (7, 3))))
    v = _with(v, route_weight=r, route_emb=re)
    a = jax.nn.sigmoid(x.mean((1, 2)) @ r + emb @ re + p["route_bias"])
    per_expert = [Conv2d(4, 3).apply({"params": {"weight": p["experts"][i], "bias": p["bias"][i]}}, x)
                  for i in range(3)]
    expected = sum(a[:, i, None, None, None] * per_expert[i] for i in range(3))
    for impl in ("experts", "vmap"):
        y = CondConv2d(4, num_experts=3, impl=impl, activation="silu").apply(v, x, emb)
        np.testing.assert_allclose(y, nn.silu(expected), rtol=1e-4, atol=1e-5)


def test_clme_experts_cycle_through_removed_kernels():
    ks = [jnp.full((3, 3, 2, 2), float(i)) for i in range(3)]
    experts, bias = clme_experts(ks, 5, biases=[jnp.full((2,), float(i)) for i in range(3)])
    assert experts.shape == (5, 3, 3, 2, 2)
    np.testing.assert_array_equal(experts[:, 0, 0, 0, 0], [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(bias[:, 0], [0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="one shape"):
        clme_experts([ks[0], jnp.zeros((1, 1, 2, 2))], 2)


# ---------------------------------------------------------------------------- GRI attention


def _block(gri=None):
    return UNetBlock(16, attention=True, num_heads=2, skip_scale=math.sqrt(0.5), attend=gri,
                     init_zero=Init("xavier_uniform"))


def test_gri_with_one_region_and_no_pooling_is_full_attention():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    emb = jax.random.normal(jax.random.key(1), (2, 12))
    # UNetBlock's `init` is a field, hence nn.Module.init
    v = _random_like(jax.eval_shape(lambda: nn.Module.init(_block(), jax.random.key(2), x, emb)))
    apply = jax.jit(lambda block, v: block.apply(v, x, emb), static_argnums=0)
    full = apply(_block(), v)
    for combine in ("joint", "mean"):
        for window in (0, 8):
            gri = apply(_block(GRIConfig(window=window, pool=1, combine=combine)), v)
            np.testing.assert_allclose(gri, full, rtol=1e-5, atol=1e-5)
    cheap = apply(_block(GRIConfig(window=4, pool=2)), v)
    assert float(jnp.abs(cheap - full).max()) > 1e-2


def test_gri_regional_and_global_branches():
    """Regional only = attention masked to the 4x4 windows; joint adds the pooled keys."""
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 64, 1, 4)) for i in range(3))
    rows, cols = np.divmod(np.arange(64), 8)
    window = (rows // 4) * 2 + cols // 4
    logits = np.asarray(q[0, :, 0] @ k[0, :, 0].T) / 2
    pooled_k = np.asarray(k[0, :, 0]).reshape(4, 2, 4, 2, 4).mean((1, 3)).reshape(16, 4)
    pooled_v = np.asarray(v[0, :, 0]).reshape(4, 2, 4, 2, 4).mean((1, 3)).reshape(16, 4)
    local = np.where(window[:, None] == window[None, :], logits, -np.inf)
    for pool, keys, values in ((0, local, v[0, :, 0]),
                               (2, np.concatenate([local, np.asarray(q[0, :, 0]) @ pooled_k.T / 2], 1),
                                np.concatenate([v[0, :, 0], pooled_v]))):
        p = np.exp(keys - keys.max(1, keepdims=True))
        expected = (p / p.sum(1, keepdims=True)) @ values
        out = gri_attention(q, k, v, 8, 8, GRIConfig(window=4, pool=pool, combine="joint"))
        np.testing.assert_allclose(out[0, :, 0], expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- surgery


def test_surgery_names_valid_choices():
    with pytest.raises(ValueError, match="drop_blocks entry 'enc.8x8_block7'.*'enc.8x8_block0'"):
        ddpmpp(**{**NET.__dict__, "surgery": Surgery(drop_blocks=("enc.8x8_block7",))})
    with pytest.raises(ValueError, match="drop_attention entry 'enc.8x8_block0'.*'enc.4x4_block0'"):
        ddpmpp(**{**NET.__dict__, "surgery": {"drop_attention": ("enc.8x8_block0",)}})
    with pytest.raises(ValueError, match="GRI window 3 .* valid choices: 0 or \\[1, 2, 4\\]"):
        asdm.student(Denoiser(net=NET), attention="gri", gri_window=3)
    with pytest.raises(ValueError, match="unknown attention 'sparse'; valid choices: 'full', 'gri'"):
        asdm.student(Denoiser(net=NET), attention="sparse")


def test_student_inherits_the_teacher_and_costs_less(teacher, run_fn):
    denoiser, params = teacher
    pruned = asdm.student(denoiser, drop_blocks=DROP, drop_attention=("dec.4x4_block1",))
    p_params, report = asdm.inherit_params(_init(pruned, 7), params, dropped=DROP)
    assert not report["new"] and report["inherited"] == len(jax.tree.leaves(p_params))
    assert "conv0" not in p_params["model"]["enc_4x4_block0"]
    assert "qkv" not in p_params["model"]["dec_4x4_block1"]
    assert asdm.count_params(p_params) < asdm.count_params(params)
    assert asdm.denoiser_flops(pruned, p_params) < 0.9 * asdm.denoiser_flops(denoiser, params)
    out, nodes = run_fn(pruned, p_params, 1.0)
    assert out.shape == X.shape and bool(jnp.all(jnp.isfinite(out)))
    # a dropped block without projection is the identity: dec.4x4_in1 passes in0's output on
    np.testing.assert_array_equal(nodes["dec.4x4_in0"][0], nodes["dec.4x4_in1"][0])
    teacher_nodes = run_fn(denoiser, params, 1.0)[1]
    # blocks before the first dropped one are untouched; later ones change
    np.testing.assert_allclose(nodes["enc.4x4_down"][0], teacher_nodes["enc.4x4_down"][0],
                               rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(nodes["dec.8x8_block1"][0] - teacher_nodes["dec.8x8_block1"][0]).max()) > 1e-3


def test_clme_condconv_student_takes_removed_kernels(teacher, run_fn):
    denoiser, params = teacher
    student = asdm.student(denoiser, drop_blocks=DROP, condconv_experts=3, attention="gri",
                               gri_window=2, gri_pool=2)
    s_params, report = asdm.inherit_params(_init(student, 7), params, dropped=DROP)
    t = params["model"]
    experts = s_params["model"]["enc_4x4_block0"]["condconv"]["experts"]
    # own conv0 (8 -> 16) first; its conv1 (16 -> 16) does not fit; then the nearest removed
    # block with an 8 -> 16 kernel: none, so the kernel repeats
    np.testing.assert_array_equal(experts[0], t["enc_4x4_block0"]["conv0"]["weight"])
    np.testing.assert_array_equal(experts[1], experts[0])
    in1 = s_params["model"]["dec_4x4_in1"]["condconv"]["experts"]  # 16 -> 16: cross-layer
    np.testing.assert_array_equal(in1[0], t["dec_4x4_in1"]["conv0"]["weight"])
    np.testing.assert_array_equal(in1[1], t["dec_4x4_in1"]["conv1"]["weight"])
    np.testing.assert_array_equal(in1[2], t["enc_4x4_block0"]["conv1"]["weight"])
    assert report["clme"] == {"enc_4x4_block0": 1, "dec_4x4_in1": 3, "dec_8x8_block0": 1}
    assert all(p.split("/")[-1].startswith("route") for p in report["new"])
    assert "norm0" in s_params["model"]["dec_8x8_block0"]
    out = run_fn(student, s_params, 1.0)[0]
    assert out.shape == X.shape and bool(jnp.all(jnp.isfinite(out)))


# ---------------------------------------------------------------------------- switching


def test_switch_sigma_splits_the_grid():
    grid = np.array([80.0, 10.0, 1.0, 0.1, 0.0])
    assert asdm.switch_sigma(grid, 2) == pytest.approx(math.sqrt(10.0))
    full = [t > asdm.switch_sigma(grid, 2) for t in grid]
    assert full == [True, True, False, False, False]
    assert not any(t > asdm.switch_sigma(grid, 0) for t in grid)
    assert all(t > asdm.switch_sigma(grid, 5) for t in grid)


def test_multi_unet_runs_the_full_model_above_the_switch(teacher, run_fn):
    denoiser, params = teacher
    light = asdm.student(denoiser, drop_blocks=DROP)
    l_params, _ = asdm.inherit_params(_init(light, 7), params, dropped=DROP)
    multi = asdm.MultiUNetDenoiser(denoiser, light, switch=2.0)
    both = {"full": params, "light": l_params}
    assert set(jax.eval_shape(lambda: _init(multi))) == {"full", "light"}
    multi_fn = jax.jit(lambda p, sigma: multi.apply({"params": p}, X, jnp.full(4, sigma), LABELS))
    for sigma, model, p in ((5.0, denoiser, params), (0.5, light, l_params)):
        np.testing.assert_allclose(multi_fn(both, sigma), run_fn(model, p, sigma)[0],
                                   rtol=1e-5, atol=1e-5)
    fn = asdm.get_multi_unet_fn(lambda x, t: x * 0 + 1.0, lambda x, t: x * 0 - 1.0, 2.0)
    assert float(fn(X, jnp.full(4, 3.0)).mean()) == 1.0 and float(fn(X, jnp.full(4, 1.0)).mean()) == -1.0
