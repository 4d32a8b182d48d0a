"""UNets: golden outputs of EDM's PyTorch networks, skip scales as data, the feature cache."""
import collections
import json
import pathlib
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax.models import (Denoiser, FeatureGraph, UNetConfig, adm, ddpmpp, feature_nodes, load_edm,
                            ncsnpp, nodes_to_compute, read_edm_snapshot, skip_connections)


# Golden outputs of EDM's own PyTorch networks (NVlabs/edm, random weights, see
# tests/data/README.md). The small ones live in the repository; the larger ones of the
# project's shared folder are an optional extra check, skipped where that folder is absent.
DATA = pathlib.Path(__file__).resolve().parent / "data"
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden"
DDPMPP, ADM = DATA / "edm_ddpmpp_small.npz", DATA / "edm_adm_small.npz"
GOLDEN_FILES = [DDPMPP, ADM] + [
    pytest.param(SHARED / name, marks=pytest.mark.skipif(
        not (SHARED / name).exists(),
        reason=f"optional larger golden file {name} is not here (../shared/golden is not part "
               "of the repository; the small goldens in tests/data are the check)"))
    for name in ("edm_ddpmpp_cond16.npz", "edm_adm_cond16.npz")]


def _golden(path):
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    return data, json.loads(str(data["config_json"]))


def _check_against_golden(denoiser, variables, data):
    x = jnp.asarray(data["input/x_nchw"]).transpose(0, 2, 3, 1)
    out = jax.jit(denoiser.apply)(variables, x, data["input/sigma"], data["input/class_labels"])
    ref = data["output/D_nchw"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_state_dict_reproduces_edm_output(path):
    data, cfg = _golden(path)
    denoiser, variables = load_edm(path, **cfg)
    _check_against_golden(denoiser, variables, data)


class _Persistent:
    """Pickles like EDM's `torch_utils.persistence` classes (module source + state)."""


def _fake_snapshot(tmp_path, data, cfg):
    """Writes `network-snapshot-*.pkl` in EDM's pickle format from the golden state_dict."""
    import torch

    pkg = tmp_path / "fake_edm" / "torch_utils"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "persistence.py").write_text(
        "import torch\n"
        "def _reconstruct_persistent_obj(meta):\n    raise RuntimeError('must not run')\n"
        "class Persistent(torch.nn.Module):\n"
        "    def __init__(self, class_name):\n"
        "        super().__init__(); self._class_name = class_name\n"
        "    def __reduce__(self):\n"
        "        meta = dict(type='class', version=6, module_src='raise SystemExit',\n"
        "                    class_name=self._class_name, state=dict(self.__dict__))\n"
        "        return (_reconstruct_persistent_obj, (meta,), None)\n")
    sys.path.insert(0, str(tmp_path / "fake_edm"))
    try:
        from torch_utils.persistence import Persistent

        def node(path, cls="Module"):
            return Persistent(cls)

        root = Persistent("EDMPrecond")
        root._init_kwargs = dict(cfg)
        for key, value in data.items():
            if not key.startswith("param/"):
                continue
            parts = key.removeprefix("param/").split(".")
            mod = root
            for i, part in enumerate(parts[:-1]):
                if part not in mod._modules:
                    child = torch.nn.ModuleDict() if part in ("enc", "dec") else node(parts[: i + 1])
                    mod.add_module(part, child)
                mod = mod._modules[part]
            tensor = torch.as_tensor(value)
            if parts[-1] == "resample_filter":
                mod.register_buffer(parts[-1], tensor)
            else:
                mod.register_parameter(parts[-1], torch.nn.Parameter(tensor))
        path = tmp_path / "network-snapshot-000000.pkl"
        with open(path, "wb") as f:
            pickle.dump(dict(ema=root, loss_fn=collections.OrderedDict(), dataset_kwargs={}), f)
    finally:
        sys.path.remove(str(tmp_path / "fake_edm"))
        for mod in [m for m in sys.modules if m.startswith("torch_utils")]:
            del sys.modules[mod]
    return path


def test_snapshot_pickle_loads_without_edm_code(tmp_path):
    pytest.importorskip("torch")
    data, cfg = _golden(DDPMPP)
    path = _fake_snapshot(tmp_path, data, cfg)
    state_dict, kwargs, precond = read_edm_snapshot(str(path))
    assert precond == "edm" and kwargs["model_channels"] == cfg["model_channels"]
    denoiser, variables = load_edm(path)  # architecture from the pickle itself
    _check_against_golden(denoiser, variables, data)


# ----------------------------------------------------------------------------
# Skip scales and the encoder/decoder split, on small random networks.

TINY = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=3, model_channels=16,
            channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)
FAMILIES = {
    "ddpmpp": ddpmpp(**TINY),
    "ncsnpp": ncsnpp(**TINY),
    "ncsnpp_skip": ncsnpp(**TINY, encoder_type="skip", decoder_type="skip"),
    "adm": adm(**{**TINY, "model_channels": 32, "attn_resolutions": (4,)}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request):
    denoiser = Denoiser(net=FAMILIES[request.param])
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    sigma = jnp.array([0.3, 2.0])
    labels = jnp.array([0, 2])
    # Random parameters (not EDM's init, whose zero-initialised output layers would hide
    # bugs); drawn with numpy from the shapes, which spares compiling the init.
    shapes = jax.eval_shape(denoiser.init, jax.random.key(1), x, sigma, labels)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, s.dtype), shapes)
    apply = jax.jit(lambda v, x, s, l, scales: denoiser.apply(v, x, s, l, skip_scales=scales))
    return denoiser, variables, (x, sigma, labels), apply


def test_skip_scales_of_ones_are_the_identity(tiny):
    denoiser, variables, (x, sigma, labels), apply = tiny
    n = len(skip_connections(denoiser.net))
    plain = apply(variables, x, sigma, labels, None)
    ones = apply(variables, x, sigma, labels, jnp.ones(n))
    np.testing.assert_allclose(plain, ones, atol=1e-6)
    assert plain.shape == x.shape


def test_skip_scales_change_output_and_vmap_equals_loop(tiny):
    denoiser, variables, (x, sigma, labels), apply = tiny
    n = len(skip_connections(denoiser.net))
    settings = jnp.stack([jnp.linspace(1.0, 0.6, n), jnp.linspace(0.8, 1.2, n)])
    batched = jax.vmap(lambda s: apply(variables, x, sigma, labels, s))(settings)
    for i in range(2):
        np.testing.assert_allclose(batched[i], apply(variables, x, sigma, labels, settings[i]),
                                   atol=1e-5)
    assert float(jnp.abs(batched[0] - apply(variables, x, sigma, labels, None)).max()) > 1e-3


def test_grad_with_respect_to_skip_scales(tiny):
    denoiser, variables, (x, sigma, labels), _ = tiny
    if denoiser.net.encoder_type != "standard":
        pytest.skip("the plain families cover differentiation; spare the compile")
    n = len(skip_connections(denoiser.net))
    loss = jax.jit(lambda s: jnp.sum(denoiser.apply(variables, x, sigma, labels, skip_scales=s) ** 2))
    g = jax.jit(jax.grad(loss))(jnp.ones(n))
    assert g.shape == (n,) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
    eps = 1e-2
    e0 = jnp.zeros(n).at[0].set(eps)
    fd = (loss(jnp.ones(n) + e0) - loss(jnp.ones(n) - e0)) / (2 * eps)
    np.testing.assert_allclose(g[0], fd, rtol=2e-2)


def test_cached_run_reuses_exactly_what_it_is_told(tiny):
    """Storing every node, then rebuilding the output from any cut of the cache at the same
    (x, sigma), gives the plain output (one compiled function per family)."""
    denoiser, variables, (x, sigma, labels), apply = tiny
    nodes = feature_nodes(denoiser.net)
    units = tuple(n.name + ".attn" for n in nodes if n.attention)
    encoder = tuple(n.name for n in nodes if n.kind in ("encoder", "middle"))
    cuts = {"encoder": encoder, "deep branch": (nodes[-3].name,), "attention units": units}

    def run(v, x, reuse=(), store=(), cache=None, output=True):
        return denoiser.apply(v, x, sigma, labels, cache=cache, reuse=reuse, store=store,
                              output=output, method=Denoiser.run)

    @jax.jit
    def outputs(v):
        full, cache = run(v, x, store=tuple(n.name for n in nodes[:-1]) + units)
        outs = {name: run(v, x, cut, (), {k: cache[k] for k in cut})[0]
                for name, cut in cuts.items()}
        # parallel decoding's form: no x, the raw output F stored, D formed afterwards
        f = run(v, None, encoder, ("out",), {k: cache[k] for k in encoder}, output=False)[1]["out"]
        c_skip, c_out = (c[:, None, None, None] for c in denoiser.coefficients(sigma)[:2])
        outs["parallel"] = c_skip * x + c_out * f
        return full, cache, outs

    plain = apply(variables, x, sigma, labels, None)
    full, cache, outs = outputs(variables)
    np.testing.assert_allclose(full, plain, atol=1e-5)  # another compilation: not bitwise
    for info in skip_connections(denoiser.net):
        assert cache["enc." + info.name][0].shape[1:] == (info.resolution, info.resolution,
                                                            info.channels)
    for name, out in outs.items():
        np.testing.assert_allclose(out, plain, atol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="needs the input x"):
        run(variables, None)


def test_nodes_to_compute_follows_the_graph():
    cfg = ddpmpp(**{**TINY, "channel_mult": (1, 2, 2), "num_blocks": 1})
    nodes = feature_nodes(cfg)
    everything = {n.name for n in nodes}
    assert nodes_to_compute(nodes) == everything
    encoder = {n.name for n in nodes if n.kind in ("encoder", "middle")}
    assert nodes_to_compute(nodes, reuse=encoder) == everything - encoder
    # DeepCache: reuse the decoder state entering the top level's first block: only the
    # top-level encoder blocks (whose skips it still reads) and decoder blocks run
    branch = "dec.8x8_up"
    assert nodes_to_compute(nodes, reuse={branch}) == {
        "enc.8x8_conv", "enc.8x8_block0", "dec.8x8_block0", "dec.8x8_block1", "out"}
    # storing a unit forces its block; storing alone (no output) computes only what it needs
    assert nodes_to_compute(nodes, store={"dec.2x2_in0.attn"}, output=False) == {
        n.name for n in nodes[:nodes.index(next(n for n in nodes if n.name == "dec.2x2_in0")) + 1]}
    with pytest.raises(ValueError, match="unknown feature nodes.*'enc.8x8_conv'"):
        nodes.check_names({"enc.9x9_conv"}, "reuse")


def test_feature_graph_nodes_are_typed():
    graph = feature_nodes(ddpmpp(**{**TINY, "channel_mult": (1, 2, 2)}))
    assert [(n.name, n.op, n.channels) for n in graph.skips] == [
        ("enc.8x8_conv", "conv", 16), ("enc.8x8_block0", "block", 16), ("enc.4x4_down", "down", 16),
        ("enc.4x4_block0", "block", 32), ("enc.2x2_down", "down", 32), ("enc.2x2_block0", "block", 32)]
    assert (graph.skip_reader(0).name, graph.skip_reader(5).name) == ("dec.8x8_block1", "dec.2x2_block0")
    assert graph.groups == ("enc.8x8", "enc.4x4", "enc.2x2", "dec.2x2", "dec.4x4", "dec.8x8")
    assert [n.kind for n in graph if n.group == "dec.2x2"] == ["middle", "middle", "decoder", "decoder"]
    assert [n.name for n in graph if n.attention] == ["enc.4x4_block0", "dec.2x2_in0", "dec.4x4_block1"]
    with pytest.raises(ValueError, match="ending with 'out'"):
        FeatureGraph(graph[:-1])


def test_skip_connections_listed_top_to_bottom():
    skips = skip_connections(ddpmpp(**{**TINY, "channel_mult": (1, 2, 2), "num_blocks": 2}))
    assert [s.name for s in skips] == ["8x8_conv", "8x8_block0", "8x8_block1", "4x4_down",
                                       "4x4_block0", "4x4_block1", "2x2_down", "2x2_block0",
                                       "2x2_block1"]
    assert [s.resolution for s in skips] == [8, 8, 8, 4, 4, 4, 2, 2, 2]


# ----------------------------------------------------------------------------
# Bad input.


def test_bad_architecture_choices_name_the_valid_ones():
    with pytest.raises(ValueError, match="valid choices: 'SongUNet', 'DhariwalUNet'"):
        UNetConfig(model_type="Transformer")
    with pytest.raises(ValueError, match="valid choices"):
        UNetConfig(encoder_type="fancy")
    with pytest.raises(ValueError, match="not divisible by 4"):
        UNetConfig(img_resolution=18, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="valid"):
        load_edm(DDPMPP, model_type="SongUNet", img_resolution=16, bogus=1)
    narrow = ddpmpp(img_resolution=8, in_channels=1, out_channels=1, model_channels=2,
                    channel_mult=(1,), attn_resolutions=())  # EDM: min(32, 2 // 4) = 0 groups
    with pytest.raises(ValueError, match="GroupNorm over 2 channels"):
        jax.eval_shape(Denoiser(net=narrow).init, jax.random.key(0), jnp.ones((1, 8, 8, 1)),
                       jnp.ones(1))


def test_weights_of_another_architecture_are_a_clear_error():
    data, cfg = _golden(DDPMPP)
    with pytest.raises(ValueError, match="do not fit this architecture"):
        load_edm(DDPMPP, **{**cfg, "model_channels": 2 * cfg["model_channels"]})
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_edm("/nonexistent/network-snapshot.pkl")


def test_wrong_number_of_skip_scales():
    denoiser = Denoiser(net=FAMILIES["ddpmpp"])
    x = jnp.zeros((1, 8, 8, 1))
    v = jax.eval_shape(denoiser.init, jax.random.key(0), x, 1.0)
    with pytest.raises(ValueError, match="skip connections"):
        jax.eval_shape(lambda v: denoiser.apply(v, x, 1.0, skip_scales=jnp.ones(2)), v)


# ----------------------------------------------------------------------------
# EDM's constructor arguments at their limits (tests/data/edm_variants.npz, written by EDM's
# own networks.py: tests/data/make_edm_variants.py).

VARIANTS = pathlib.Path(__file__).resolve().parent / "data" / "edm_variants.npz"
VARIANT_NAMES = ["ncsnpp_aug", "skip_encoder", "no_blocks_one_level", "adm_aug", "adm_narrow"]


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_edm_arguments_at_their_limits_give_edms_output(name, tmp_path):
    with np.load(VARIANTS) as f:
        data = {k[len(name) + 1:]: f[k] for k in f.files if k.startswith(name + "/")}
    cfg = json.loads(str(data["config_json"]))
    params = {k: v.astype(np.float32) for k, v in data.items() if k.startswith("param/")}
    np.savez(tmp_path / "w.npz", **params)
    denoiser, variables = load_edm(tmp_path / "w.npz", **cfg)
    x = jnp.asarray(data["input/x_nchw"]).transpose(0, 2, 3, 1)
    out = jax.jit(lambda v, x, s, c, a: denoiser.apply(v, x, s, c, augment_labels=a))(
        variables, x, data["input/sigma"], data.get("input/class_labels"),
        data.get("input/augment_labels"))
    ref = data["output/D_nchw"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)  # max error here ~2e-7


@pytest.mark.parametrize("kernel,padding,cin,width,matmuls", [
    (3, 1, 96, 24, True), (3, 2, 96, 25, True), (3, 1, 3, 6, False), (1, 0, 96, 24, False)])
def test_conv2d_derivatives_equal_xlas(kernel, padding, cin, width, matmuls):
    """conv2d's weight derivative, as matrix products (wide convolutions on CPU) or XLA's: its
    gradients, forward-mode derivative and a second derivative equal those of XLA's
    convolution."""
    from difflax.models.layers import conv2d, matmul_weight_derivative
    x = jax.random.normal(jax.random.key(0), (2, 5, width, cin))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, 4)) / np.sqrt(cin)
    assert matmul_weight_derivative(x.shape, w.shape) == matmuls
    lax_conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), [(padding, padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = lambda x, w: conv2d(x, w, padding)
    loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
    np.testing.assert_array_equal(ours(x, w), lax_conv(x, w))
    for expected, got in zip(jax.grad(loss(lax_conv), (0, 1))(x, w), jax.grad(loss(ours), (0, 1))(x, w)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    tangents = (jnp.cos(x), jnp.sin(w))
    np.testing.assert_allclose(jax.jvp(ours, (x, w), tangents)[1],
                               jax.jvp(lax_conv, (x, w), tangents)[1], rtol=1e-4, atol=1e-4)
    second = lambda conv: jax.grad(lambda w: jnp.sum(jax.grad(loss(conv))(x, w) ** 2))(w)
    np.testing.assert_allclose(second(ours), second(lax_conv), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("shape,groups", [((2, 5, 6, 12), 3), ((3, 4, 8), 8), ((2, 3, 3, 4), 1)])
def test_group_norm_derivatives_equal_the_plain_formulas(shape, groups):
    """group_norm's written-out derivative: its value, gradients w.r.t. x, weight and bias,
    forward-mode derivative and a second derivative equal XLA's derivatives of the plain
    formula (per-group mean and biased variance, as EDM's GroupNorm)."""
    from difflax.models.layers import group_norm
    keys = jax.random.split(jax.random.key(0), 3)
    x = 3 * jax.random.normal(keys[0], shape) + 1
    weight, bias = (jax.random.normal(k, shape[-1:]) for k in keys[1:])

    def plain(x, weight, bias):
        y = x.reshape(*x.shape[:-1], groups, -1)
        axes = tuple(range(1, y.ndim - 2)) + (y.ndim - 1,)
        mean = y.mean(axes, keepdims=True)
        var = jnp.square(y - mean).mean(axes, keepdims=True)
        return ((y - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape) * weight + bias

    ours = lambda x, weight, bias: group_norm(x, weight, bias, groups, 1e-5)
    loss = lambda norm: lambda *a: jnp.sum(jnp.sin(norm(*a)))
    args = (x, weight, bias)
    np.testing.assert_allclose(ours(*args), plain(*args), rtol=1e-5, atol=1e-5)
    for expected, got in zip(jax.grad(loss(plain), (0, 1, 2))(*args),
                             jax.grad(loss(ours), (0, 1, 2))(*args)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    tangents = tuple(jnp.cos(a) for a in args)
    np.testing.assert_allclose(jax.jvp(ours, args, tangents)[1],
                               jax.jvp(plain, args, tangents)[1], rtol=1e-4, atol=1e-5)
    second = lambda norm: jax.grad(  # d/dx of |d loss / d weight|^2
        lambda x: jnp.sum(jax.grad(loss(norm), 1)(x, weight, bias) ** 2))(x)
    np.testing.assert_allclose(second(ours), second(plain), rtol=1e-3, atol=1e-4)
