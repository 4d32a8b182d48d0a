"""Mixed precision: a Denoiser with dtype="bfloat16" computes its UNet in bfloat16 on float32
parameters (EDMPrecond's use_fp16 scheme), stays close to float32, and trains with float32
parameters and gradients (`train.compute_dtype`); a SiT with dtype="bfloat16" does the same
for its blocks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import schedules
from difflax.accel import encoder_propagation_plan
from difflax.interpolants import sit_run_fn
from difflax.models import Denoiser, adm, ddpmpp
from difflax.models.sit import SiT, SiTBlock, SiTConfig
from difflax.samplers.cached import sample_with_plan
from difflax.training import TrainConfig, get_edm_loss_fn, train
from difflax.training.interpolant_loss import get_interpolant_loss_fn

TINY = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=3, model_channels=16,
            channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)
NETS = {"ddpmpp": ddpmpp(**TINY), "adm": adm(**{**TINY, "model_channels": 32})}


def operand_dtypes(fn, *args) -> dict[str, list]:
    """{primitive: [operand dtypes of each use]} for the convolutions and matmuls of fn,
    sub-computations (remat, scans) included."""
    out = {"conv_general_dilated": [], "dot_general": []}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in out:
                out[eqn.primitive.name].append({str(v.aval.dtype) for v in eqn.invars})
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return out


def float32_only(model, params, *args) -> bool:
    """No convolution or matmul of model.apply touches anything but float32."""
    return all(d == {"float32"} for v in operand_dtypes(
        lambda p, *a: model.apply(p, *a), params, *args).values() for d in v)


def relative_difference(low, ref) -> float:
    return float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))


def gradient_cosine(a, b) -> float:
    a, b = (jnp.concatenate([v.ravel() for v in jax.tree.leaves(g)]) for g in (a, b))
    return float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b))


@pytest.fixture(scope="module", params=list(NETS))
def pair(request):
    f32 = Denoiser(net=NETS[request.param])
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    sigma = jnp.array([0.05, 0.5, 2.0, 20.0])
    labels = jnp.arange(4) % 3
    params = jax.jit(f32.init)(jax.random.key(1), x, sigma, labels)  # eager init: ~50 s
    # off the zero-initialised output layers, so that every layer matters
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                       for p, k in zip(leaves, keys)])
    return f32, f32.clone(dtype="bfloat16"), params, (x, sigma, labels)


def test_bfloat16_unet_runs_every_convolution_in_bfloat16(pair):
    f32, bf16, params, args = pair
    ops = operand_dtypes(lambda p, *a: bf16.apply(p, *a), params, *args)
    assert ops["conv_general_dilated"] and all(
        d == {"bfloat16"} for d in ops["conv_general_dilated"]), ops["conv_general_dilated"]
    # the embedding MLP (on float32 sinusoidal features) and the attention logits stay
    # float32, as in EDM's use_fp16; the float32 model has no bfloat16 at all
    assert {"float32"} in ops["dot_general"]
    assert float32_only(f32, params, *args)
    assert jax.eval_shape(bf16.apply, params, *args).dtype == jnp.float32


def test_bfloat16_denoiser_is_close_to_float32(pair):
    f32, bf16, params, args = pair
    ref, low = jax.jit(f32.apply)(params, *args), jax.jit(bf16.apply)(params, *args)
    rel = relative_difference(low, ref)
    assert 1e-4 < rel < 3e-2, rel  # bfloat16's 8-bit mantissa: differs, but by ~1%


def test_bfloat16_training_keeps_float32_parameters_and_gradients(pair):
    f32, bf16, params, (x, _, labels) = pair
    key = jax.random.key(3)
    grads = {}
    for name, model in (("f32", f32), ("bf16", bf16)):
        loss_fn = get_edm_loss_fn(model)
        grads[name] = jax.jit(jax.grad(loss_fn))(params["params"], (x, labels), key)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads["bf16"]))
    cos = gradient_cosine(grads["f32"], grads["bf16"])
    assert cos > 0.99, cos


def test_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="valid choices: float32, bfloat16, float16"):
        Denoiser(net=NETS["ddpmpp"], dtype="fp8").init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.ones(1), jnp.zeros(1, int))


def test_train_compute_dtype_trains_a_denoiser_in_bfloat16(tmp_path):
    model = Denoiser(net=NETS["ddpmpp"])
    rng = np.random.default_rng(0)
    batches = lambda start: iter([(rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),  # noqa: E731
                                   rng.integers(0, 3, 8))] * 4)
    cfg = TrainConfig(steps=2, batch_size=8, warmup_steps=1, ckpt_every=0, log_every=1,
                      compute_dtype="bfloat16")
    state = train(cfg, model, batches, str(tmp_path), progress=False)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    assert int(state.step) == 2


def test_compute_dtypes_that_cannot_train_are_refused():
    from difflax.training.loop import with_compute_dtype

    with pytest.raises(ValueError, match="float16 needs loss scaling"):
        with_compute_dtype(Denoiser(net=NETS["ddpmpp"]), "float16")
    with pytest.raises(ValueError, match="has no `dtype` field"):
        with_compute_dtype(object(), "bfloat16")
    assert with_compute_dtype(SiT(SIT), "bfloat16").dtype == "bfloat16"


# ----------------------------------------------------------------------------
# SiT: the patch embedding and the blocks in bfloat16; the conditioning and the final layer
# in float32.

SIT = SiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                num_classes=3, snippet_dim=4, learn_sigma=False)
BLOCK_MATMULS = 7  # adaLN, qkv, q.k, weights.v, proj, fc1, fc2


@pytest.fixture(scope="module")
def sit_pair():
    f32 = SiT(SIT)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    args = (x, jnp.array([0.05, 0.3, 0.7, 0.95]), jnp.arange(4) % 3,
            jax.random.normal(jax.random.key(1), (4, 4)))
    params = jax.jit(f32.init)(jax.random.key(2), *args)
    leaves, tree = jax.tree.flatten(params)  # off the zero-initialised adaLN and output layers
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                       for p, k in zip(leaves, keys)])
    return f32, f32.clone(dtype="bfloat16"), params, args


def test_bfloat16_sit_runs_its_blocks_in_bfloat16(sit_pair):
    f32, bf16, params, args = sit_pair
    tokens = jax.random.normal(jax.random.key(4), (4, 16, 32), jnp.bfloat16)
    c = jax.random.normal(jax.random.key(5), (4, 32))
    block = SiTBlock(SIT.num_heads, dtype="bfloat16")
    block_params = {"params": params["params"]["blocks_0"]}
    ops = operand_dtypes(lambda p, x, c: block.apply(p, x, c), block_params, tokens, c)
    assert len(ops["dot_general"]) == BLOCK_MATMULS
    assert all(d == {"bfloat16"} for d in ops["dot_general"]), ops["dot_general"]
    assert jax.eval_shape(block.apply, block_params, tokens, c).dtype == jnp.bfloat16
    # the whole SiT: the patch embedding and the blocks' matmuls in bfloat16, the time, label
    # and snippet embeddings and the final layer in float32; the float32 SiT has no bfloat16
    ops = operand_dtypes(lambda p, *a: bf16.apply(p, *a), params, *args)
    assert ops["conv_general_dilated"] == [{"bfloat16"}]
    dots = ops["dot_general"]
    assert sum(d == {"bfloat16"} for d in dots) == BLOCK_MATMULS * SIT.depth
    assert all(d in ({"bfloat16"}, {"float32"}) for d in dots) and {"float32"} in dots
    assert float32_only(f32, params, *args)
    assert jax.eval_shape(bf16.apply, params, *args).dtype == jnp.float32


def test_bfloat16_sit_is_close_to_float32(sit_pair):
    f32, bf16, params, args = sit_pair
    ref, low = jax.jit(f32.apply)(params, *args), jax.jit(bf16.apply)(params, *args)
    rel = relative_difference(low, ref)
    assert 1e-4 < rel < 3e-2, rel


def test_bfloat16_sit_gradients_are_float32_and_point_the_same_way(sit_pair):
    f32, bf16, params, (x, _, labels, snippets) = sit_pair
    grads = [jax.jit(jax.grad(get_interpolant_loss_fn(model)))(
        params["params"], (x, labels, snippets), jax.random.key(6)) for model in (f32, bf16)]
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads[1]))
    cos = gradient_cosine(*grads)
    assert cos > 0.99, cos


def test_bfloat16_sit_runs_feature_reuse_plans(sit_pair):
    """Faster Diffusion's encoder propagation on the bfloat16 SiT: its cached tokens are
    bfloat16, its samples float32 and close to the float32 SiT's under the same plan."""
    f32, bf16, params, (x, _, labels, snippets) = sit_pair
    graph = SIT.feature_graph(encoder_depth=1)
    plan = encoder_propagation_plan(graph, 6, key_steps=(0, 2, 4))

    def draw(model):
        return jax.jit(lambda n: sample_with_plan(
            sit_run_fn(model, params, labels, snippets), n, plan=plan, config=graph,
            schedule=schedules.rectified_flow(), sampler="ddim", steps=6,
            prediction="velocity")[0])(x)

    _, stored = bf16.apply(params, x, 0.5, labels, snippets, method=SiT.run, store=("blocks.0",))
    assert stored["blocks.0"].dtype == jnp.bfloat16
    ref, low = draw(f32), draw(bf16)
    assert low.dtype == jnp.float32
    rel = relative_difference(low, ref)
    assert 1e-4 < rel < 3e-2, rel


def test_train_compute_dtype_trains_a_sit_in_bfloat16(tmp_path):
    """The loss `train` builds is the bfloat16 SiT's (`get_loss_fn` is given the model in
    `compute_dtype`), and the parameters stay float32."""
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(8, 8, 8, 1)).astype(np.float32), rng.integers(0, 3, 8),
             rng.normal(size=(8, 4)).astype(np.float32))
    seen = []

    def get_loss_fn(model):
        seen.append(model.dtype)
        return get_interpolant_loss_fn(model)

    cfg = TrainConfig(steps=2, batch_size=8, warmup_steps=1, ckpt_every=0, log_every=1,
                      compute_dtype="bfloat16")
    state = train(cfg, SiT(SIT), lambda start: iter([batch] * 4), str(tmp_path),
                  get_loss_fn=get_loss_fn, progress=False)
    assert seen == ["bfloat16"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    assert int(state.step) == 2
