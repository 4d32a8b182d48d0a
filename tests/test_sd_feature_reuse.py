"""Feature-reuse plans and Skip-Tuning schedules on Stable Diffusion's UNet: the plans of
difflax.accel run on its feature graph unchanged (a tiny random SD UNet, DDIM
with classifier-free guidance on SD's discrete schedule)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import schedules
from difflax.accel import (deepcache_plan, encoder_nodes, encoder_propagation_plan, full_plan,
                           node_flops,
                           inheritance_plan, linear_skip_scales, per_resolution_skip_scales,
                           per_skip_scales, plan_cost, sample_with_plan)
from difflax.accel.deepcache import deepcache_branch_node
from difflax.models import SDUNet, SDUNetConfig, feature_graph, sd_skip_connections
from difflax.models.sd_unet import sd_run_fn
from difflax.models.sd_unet_weights import init_sd_unet
from difflax.samplers import sample

CFG = SDUNetConfig(sample_size=8, block_out_channels=(16, 32), layers_per_block=(1, 1),
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 2),
                   transformer_layers_per_block=(1, 1), norm_num_groups=8)
SCHEDULE = schedules.vp_discrete("scaled_linear")
STEPS = 6
GRID = np.append(np.arange(STEPS)[::-1] * (1000 // STEPS) + 1, 0.0)  # DDIM's "leading" timesteps
GUIDANCE = 3.0


@pytest.fixture(scope="module")
def model():
    unet = SDUNet(CFG)
    rng = np.random.default_rng(0)  # weights moved off their initial values
    variables = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(size=a.shape) * 0.2, a.dtype),
                             init_sd_unet(CFG, jax.random.key(0), 12))
    noise = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(4, 5, 12)), jnp.float32)  # [uncond; cond]
    return unet, variables, noise, context


def _sample(model, plan=None):
    """DDIM with guidance: plainly (the pipeline's model function over `SDUNet.__call__`) or
    through `sample_with_plan` with `sd_run_fn`."""
    unet, v, noise, context = model
    options = dict(schedule=SCHEDULE, sampler="ddim", grid=GRID, prediction="eps")
    if plan is None:
        def model_fn(x, t):
            out = unet.apply(v, jnp.concatenate([x, x]), jnp.concatenate([t, t]), context)
            uncond, cond = jnp.split(out, 2)
            return uncond + GUIDANCE * (cond - uncond)

        return jax.jit(lambda n: sample(model_fn, n, **options)[0])(noise)
    run = sd_run_fn(unet, v, context, guidance_scale=GUIDANCE)
    return jax.jit(lambda n: sample_with_plan(run, n, plan=plan, config=CFG, **options)[0])(noise)


@pytest.fixture(scope="module")
def plain(model):
    return _sample(model)


def test_sd_graph_declares_diffusers_layers_and_skips():
    graph = feature_graph(SDUNet(CFG))
    assert [(n.name, n.kind, n.inputs[1:]) for n in graph] == [
        ("conv_in", "encoder", ()), ("down_blocks_0.layer_0", "encoder", ()),
        ("down_blocks_0.downsampler", "encoder", ()), ("down_blocks_1.layer_0", "encoder", ()),
        ("mid_block", "middle", ()),
        ("up_blocks_0.layer_0", "decoder", ("down_blocks_1.layer_0",)),
        ("up_blocks_0.layer_1", "decoder", ("down_blocks_0.downsampler",)),
        ("up_blocks_0.upsampler", "decoder", ()),
        ("up_blocks_1.layer_0", "decoder", ("down_blocks_0.layer_0",)),
        ("up_blocks_1.layer_1", "decoder", ("conv_in",)), ("out", "output", ())]
    assert graph.units == ("down_blocks_0.layer_0.attn", "mid_block.attn",
                           "up_blocks_1.layer_0.attn", "up_blocks_1.layer_1.attn")
    assert [(s.name, s.resolution, s.channels) for s in sd_skip_connections(CFG)] == [
        ("conv_in", 8, 16), ("down_blocks_0_layer_0", 8, 16), ("down_blocks_0_downsampler", 4, 16),
        ("down_blocks_1_layer_0", 4, 32)]
    # SD 1.5: 12 skips; DeepCache's SD runs (cache_layer_id=0, cache_block_id=0) cache the
    # input of the up layer reading skip 1 (down block 0's first layer); its plug-in helper's
    # cache_branch_id=0 caches the input of the reader of conv_in's skip.
    sd15 = SDUNetConfig()
    assert len(sd_skip_connections(sd15)) == 12
    assert sd_skip_connections(sd15)[1].name == "down_blocks_0_layer_0"
    assert deepcache_branch_node(sd15, 1) == "up_blocks_3.layer_0"
    assert deepcache_branch_node(sd15, 0) == "up_blocks_3.layer_1"
    assert encoder_nodes(sd15) == {n.name for n in feature_graph(sd15)
                                   if n.name.startswith(("conv_in", "down_blocks", "mid_block"))}


def test_cached_nodes_replace_computation_exactly(model):
    """Reusing stored features at the same input gives the plain output bit for bit; the
    parameters of the nodes a reuse skips get exactly zero gradient."""
    unet, v, noise, context = model
    t = jnp.array([3.0, 801.0])
    branch = deepcache_plan(CFG, STEPS, branch=1, interval=2).nodes
    everything = encoder_nodes(CFG) | branch | {"mid_block.attn"}

    @jax.jit
    def check(v):
        plain = unet.apply(v, noise, t, context[2:])
        _, cache = unet.apply(v, noise, t, context[2:], store=everything, output=False,
                              method=SDUNet.run)
        reused = [unet.apply(v, noise, t, context[2:], cache=cache, reuse=reuse,
                             method=SDUNet.run)[0]
                  for reuse in (encoder_nodes(CFG), {"mid_block.attn"}, branch)]
        loss = lambda p: jnp.sum(unet.apply({"params": p}, noise, t, context[2:], cache=cache,
                                            reuse=branch, method=SDUNet.run)[0] ** 2)
        return plain, reused, jax.grad(loss)(v["params"])

    plain, reused, grads = check(v)
    for out in reused:
        np.testing.assert_array_equal(out, plain)
    norm = {k: sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(b)) for k, b in grads.items()}
    assert norm["mid_block"] == norm["down_blocks_1"] == norm["up_blocks_0"] == 0
    assert norm["conv_in"] > 0 and norm["down_blocks_0"] > 0 and norm["up_blocks_1"] > 0


def test_full_plan_and_per_step_refresh_are_the_plain_sampler(model, plain):
    np.testing.assert_array_equal(_sample(model, full_plan(STEPS)), plain)
    refresh = _sample(model, encoder_propagation_plan(CFG, STEPS, every=1))
    np.testing.assert_allclose(refresh, plain, atol=2e-5)


def test_encoder_propagation_on_sd(model, plain):
    """Faster Diffusion on SD: the encoder + mid block at key steps only; parallel decoding
    equals sequential decoding; the reuse changes the samples."""
    plan = encoder_propagation_plan(CFG, STEPS, key_steps=(0, 2, 4))
    cost = plan_cost(CFG, plan, 1)
    assert cost.node_evaluations["down_blocks_1.layer_0"] == cost.node_evaluations["mid_block"] == 3
    assert cost.node_evaluations["up_blocks_1.layer_1"] == STEPS
    sequential = _sample(model, plan)
    parallel = _sample(model, encoder_propagation_plan(CFG, STEPS, key_steps=(0, 2, 4),
                                                       parallel=True))
    np.testing.assert_allclose(parallel, sequential, rtol=1e-5, atol=2e-5)  # samples of size ~30
    assert float(jnp.abs(sequential - plain).max()) > 1e-3


def test_deepcache_and_inheritance_on_sd(model, plain):
    deepcache = deepcache_plan(CFG, STEPS, branch=1, interval=3)
    assert deepcache.nodes == {"up_blocks_0.upsampler"}  # the input of skip 1's reader
    cost = plan_cost(CFG, deepcache, 1).node_evaluations
    assert (cost["mid_block"], cost["down_blocks_0.layer_0"], cost["up_blocks_1.layer_0"]) == (
        2, STEPS, STEPS)
    unit = inheritance_plan(CFG, STEPS, granularity="unit", targets=["mid_block"])
    assert unit.nodes == {"mid_block.attn"}
    block = inheritance_plan(CFG, STEPS, granularity="block", targets=["up_blocks_0"])
    assert block.nodes == {"up_blocks_0.layer_0", "up_blocks_0.layer_1", "up_blocks_0.upsampler"}
    for plan in (deepcache, unit):
        assert float(jnp.abs(_sample(model, plan) - plain).max()) > 1e-4, plan.name


def test_skip_tuning_schedules_take_the_sd_unet():
    linear = linear_skip_scales(SDUNet(CFG), 0.9, 0.6)
    np.testing.assert_allclose(linear, [0.9, 0.8, 0.7, 0.6], rtol=1e-6)
    np.testing.assert_array_equal(per_resolution_skip_scales(CFG, {4: 0.5}), [1, 1, 0.5, 0.5])
    np.testing.assert_array_equal(per_skip_scales(CFG, {"down_blocks_0_layer_0": 0.75}),
                                  [1, 0.75, 1, 1])
    with pytest.raises(ValueError, match="no skip connections at resolutions"):
        per_resolution_skip_scales(CFG, {2: 0.5})


def test_node_flops_add_up_to_a_full_evaluation(model):
    """XLA's FLOPs per feature node (the parameters passed as arguments, not constants) add up
    to those of one whole guided UNet call, and a plan's compute is weighed by them."""
    unet, v, noise, context = model
    run = sd_run_fn(unet, v, context, guidance_scale=GUIDANCE)
    t = jnp.full((2,), 500.0)
    flops = node_flops(unet, run, noise, t)
    assert set(flops) == {n.name for n in feature_graph(unet)} and min(flops.values()) > 0
    whole = jax.jit(lambda x: run(x, t)[0]).lower(noise).compile().cost_analysis()
    whole = float((whole[0] if isinstance(whole, list) else whole)["flops"])
    assert abs(sum(flops.values()) / whole - 1) < 0.05
    cost = plan_cost(unet, encoder_propagation_plan(unet, STEPS, key_steps=(0, 3)), 1)
    assert 0.5 < cost.equivalent_nfe(flops) / STEPS < 1
