"""Mixed precision: a Denoiser with dtype="bfloat16" computes its UNet in bfloat16 on float32
parameters (EDMPrecond's use_fp16 scheme), stays close to float32, and trains with float32
parameters and gradients (`train.compute_dtype`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax.models import Denoiser, adm, ddpmpp
from difflax.training import get_edm_loss_fn

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
    assert all(d == {"float32"} for v in operand_dtypes(
        lambda p, *a: f32.apply(p, *a), params, *args).values() for d in v)
    assert jax.eval_shape(bf16.apply, params, *args).dtype == jnp.float32


def test_bfloat16_denoiser_is_close_to_float32(pair):
    f32, bf16, params, args = pair
    ref, low = jax.jit(f32.apply)(params, *args), jax.jit(bf16.apply)(params, *args)
    rel = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
    assert 1e-4 < rel < 3e-2, rel  # bfloat16's 8-bit mantissa: differs, but by ~1%


def test_bfloat16_training_keeps_float32_parameters_and_gradients(pair):
    f32, bf16, params, (x, _, labels) = pair
    key = jax.random.key(3)
    grads = {}
    for name, model in (("f32", f32), ("bf16", bf16)):
        loss_fn = get_edm_loss_fn(model)
        grads[name] = jax.jit(jax.grad(loss_fn))(params["params"], (x, labels), key)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads["bf16"]))
    flat = lambda g: jnp.concatenate([v.ravel() for v in jax.tree.leaves(g)])  # noqa: E731
    a, b = flat(grads["f32"]), flat(grads["bf16"])
    cos = float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b))
    assert cos > 0.99, cos


def test_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="valid choices: float32, bfloat16, float16"):
        Denoiser(net=NETS["ddpmpp"], dtype="fp8").init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.ones(1), jnp.zeros(1, int))


def test_train_compute_dtype_trains_a_denoiser_in_bfloat16(tmp_path):
    from difflax.training import TrainConfig, train

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
