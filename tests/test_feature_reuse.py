"""Feature reuse plans: what each computes and reuses, and exact agreements with the plain model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax import schedules
from difflax.accel import (deepcache_plan, deepcache_refresh_steps, denoiser_run_fn,
                           encoder_nodes, encoder_propagation_plan, faster_diffusion_key_steps,
                           full_plan, inheritance_nodes, inheritance_plan, plan_cost,
                           quad_center_steps, sample_with_plan)
from difflax.interpolants import sit_run_fn
from difflax.models import Denoiser, ddpmpp, feature_nodes
from difflax.models.sit import SiT, SiTConfig
from difflax.samplers import sample

NET = ddpmpp(img_resolution=8, in_channels=1, out_channels=1, label_dim=3, model_channels=16,
             channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)
SCHEDULE = schedules.edm(0.002, 80.0)
STEPS = 8


@pytest.fixture(scope="module")
def model():
    denoiser = Denoiser(net=NET)
    noise = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    labels = jnp.array([0, 2])
    shapes = jax.eval_shape(denoiser.init, jax.random.key(1), noise, jnp.ones(2), labels)
    rng = np.random.default_rng(0)  # random weights: EDM's zero-initialised layers hide bugs
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, s.dtype), shapes)
    return denoiser, variables, noise, labels


def _plain(model, sampler, **options):
    denoiser, v, noise, labels = model
    return jax.jit(lambda n: sample(lambda x, t: denoiser.apply(v, x, t, labels), n,
                                    schedule=SCHEDULE, sampler=sampler, steps=STEPS,
                                    prediction="x0", **options)[0])(noise)


def _with_plan(model, plan, sampler, **options):
    denoiser, v, noise, labels = model
    run = denoiser_run_fn(denoiser, v, labels)
    return jax.jit(lambda n: sample_with_plan(run, n, plan=plan, config=NET, schedule=SCHEDULE,
                                              sampler=sampler, steps=STEPS, prediction="x0",
                                              **options)[0])(noise)


@pytest.fixture(scope="module")
def plain_deis(model):
    return _plain(model, "deis_tab", order=2)


@pytest.mark.parametrize("sampler,options", [("deis_tab", {"order": 2}), ("edm_heun", {})])
def test_full_plan_is_the_plain_sampler_bit_for_bit(model, plain_deis, sampler, options):
    plain = plain_deis if sampler == "deis_tab" else _plain(model, sampler, **options)
    np.testing.assert_array_equal(_with_plan(model, full_plan(STEPS), sampler, **options), plain)


def test_refreshing_every_step_reproduces_the_plain_model(model, plain_deis):
    """A multistep solver calls the model once a step, at the refresh point: reusing what
    was just computed there changes nothing (up to XLA's fusion of another program)."""
    for plan in (encoder_propagation_plan(NET, STEPS, every=1),
                 deepcache_plan(NET, STEPS, branch=1, interval=1)):
        np.testing.assert_allclose(_with_plan(model, plan, "deis_tab", order=2), plain_deis,
                                   atol=2e-5, err_msg=plan.name)


def test_parallel_decoding_equals_sequential_and_reuse_changes_the_result(model, plain_deis):
    plan = encoder_propagation_plan(NET, STEPS, key_steps=(0, 1, 3))
    sequential = _with_plan(model, plan, "deis_tab", order=2)
    parallel = _with_plan(model, encoder_propagation_plan(NET, STEPS, key_steps=(0, 1, 3),
                                                          parallel=True), "deis_tab", order=2)
    np.testing.assert_allclose(parallel, sequential, atol=2e-5)
    assert float(jnp.abs(sequential - plain_deis).max()) > 1e-3  # the reuse is real
    # at most 4 latents = 2 steps of batch 2 per decoder call: the 5-step chunk in 3 pieces
    pieces = _with_plan(model, encoder_propagation_plan(NET, STEPS, key_steps=(0, 1, 3), parallel=True,
                                                        max_decode_batch=4), "deis_tab", order=2)
    np.testing.assert_allclose(pieces, parallel, atol=2e-5)
    with pytest.raises(ValueError, match="max_decode_batch=4 needs parallel=True"):
        encoder_propagation_plan(NET, STEPS, every=2, max_decode_batch=4)


def test_reused_blocks_are_not_computed(model):
    """Gradients w.r.t. the parameters vanish exactly for the blocks a partial call skips."""
    denoiser, v, noise, labels = model
    sigma = jnp.array([1.0, 1.0])
    nodes = feature_nodes(NET)
    _, cache = jax.jit(lambda v: denoiser.apply(v, noise, sigma, labels, method=Denoiser.run,
                                                store=tuple(n.name for n in nodes[:-1])))(v)
    branch = deepcache_plan(NET, STEPS, branch=1, interval=2).nodes
    for reuse, skipped in ((encoder_nodes(NET), ("enc_8x8_conv", "enc_4x4_block0", "dec_4x4_in0")),
                           (branch, ("enc_4x4_down", "dec_4x4_in1", "dec_4x4_block1"))):
        grads = jax.jit(jax.grad(lambda p, c: jnp.sum(denoiser.apply(
            {"params": p}, noise, sigma, labels, cache=c, reuse=reuse,
            method=Denoiser.run)[0] ** 2)))(v["params"], {k: cache[k] for k in reuse})["model"]
        norm = {k: sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(b)) for k, b in grads.items()}
        for name in skipped:
            assert norm[name] == 0, (reuse, name)
        assert norm["dec_8x8_block1"] > 0 and norm["map_layer0"] > 0


def test_plan_cost_counts_the_papers_schedule():
    plan = encoder_propagation_plan(NET, 50)
    assert faster_diffusion_key_steps(50) == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    assert faster_diffusion_key_steps(20) == (0, 1, 2, 3, 5, 10, 15)
    # the code's "100ls" / "75ls": i < 10 or i % 5 == 0 or i > 85 (65)
    assert faster_diffusion_key_steps(100) == tuple(range(10)) + tuple(range(10, 86, 5)) + tuple(
        range(86, 100))
    assert faster_diffusion_key_steps(75) == tuple(range(10)) + (10, 15, 20, 25, 30, 35, 40, 45,
                                                                  50, 55, 60, 65) + tuple(range(66, 75))
    with pytest.raises(ValueError, match="key steps for 20, 50, 75 or 100 steps, not 30"):
        encoder_propagation_plan(NET, 30)
    cost = plan_cost(NET, plan, 1)
    assert (cost.full, cost.partial, cost.free) == (9, 41, 0)
    decoder = {n.name for n in feature_nodes(NET) if n.kind in ("decoder", "output")}
    assert cost.node_evaluations == {**{n: 9 for n in encoder_nodes(NET)}, **{n: 50 for n in decoder}}
    parallel = plan_cost(NET, encoder_propagation_plan(NET, 50, parallel=True), 1)
    assert (parallel.batched_decodes, parallel.decoded_steps, parallel.free) == (9, 50, 41)
    assert parallel.node_evaluations == cost.node_evaluations
    heun = plan_cost(NET, plan, 2)  # EDM Heun: a refresh answers the first of 2 calls
    assert (heun.full, heun.partial) == (9, 91)
    unit = plan_cost(NET, inheritance_plan(NET, 8, granularity="unit", targets=["dec.4x4_in0"]), 1)
    assert (unit.full, unit.partial) == (4, 4)  # alternating: every other step reads the unit
    flops = {n: 1.0 for n in cost.node_evaluations}
    assert plan_cost(NET, full_plan(50), 1).equivalent_nfe(flops) == 50


def test_schedules_and_granularities():
    assert deepcache_refresh_steps(7, interval=3) == (True, False, False, True, False, False, True)
    assert inheritance_nodes(NET, "block", ["dec.4x4"]) == {
        "dec.4x4_in0", "dec.4x4_in1", "dec.4x4_block0", "dec.4x4_block1"}
    assert inheritance_nodes(NET, "unit", ["dec.4x4_in0"]) == {"dec.4x4_in0.attn"}
    plan = inheritance_plan(NET, 8, granularity="layer", targets=["dec.8x8_up"], window=(0.5, 1.0))
    assert plan.refresh == (True,) * 4 + (False, True, False, True)  # step 4 inherits step 3's
    with pytest.raises(ValueError, match="unknown granularity"):
        inheritance_nodes(NET, "unit-ish", ["dec.4x4_in0"])
    with pytest.raises(ValueError, match="unknown feature nodes"):
        inheritance_nodes(NET, "unit", ["dec.8x8_up"])  # no attention unit there
    with pytest.raises(ValueError, match=r"unknown blocks \['dec.2x2'\]; valid: .*'dec.4x4'"):
        inheritance_nodes(NET, "block", ["dec.2x2"])


def _quad_center_by_the_authors(total, n, center, pow):
    """DeepCache's sample_from_quad_center, transcribed point by point with Python's own
    (complex) powers: (-center) ** (1 / pow) is complex for center > 0."""
    while pow > 1:
        a, b = (-center) ** (1 / pow), (total - center) ** (1 / pow)
        xs = [a + (b - a) * k / n for k in range(n + 1)]
        ints = sorted({int(complex(x ** pow).real) for x in xs})
        indices = [0] + [v + center for v in ints[1:-1]]
        if len(indices) == n:
            return indices
        pow -= 0.02
    raise ValueError


def _full_steps(refresh):
    return [i for i, r in enumerate(refresh) if r]


def test_deepcache_non_uniform_schedule_is_the_authors():
    # center 0 by hand: 10 steps, interval 2 -> 5 full steps; 10 (k/5)^p for k = 0..5.
    # p = 1.6: 0, 0.76, 2.31, 4.42, 6.998, 10 -> ints {0, 2, 4, 6, 10}, inner 2 4 6 ->
    # [0, 2, 4, 6] has 4 < 5 entries; p lowered by 0.02 until 10 * 0.2^p >= 1, at
    # p = 1.42 (0.2^1.42 = 0.1017; 0.2^1.44 = 0.0985): 1.02, 2.72, 4.84, 7.28 -> [0, 1, 2, 4, 7]
    assert _full_steps(deepcache_refresh_steps(10, interval=2, power=1.6, center=0)) == [0, 1, 2, 4, 7]
    steps, p = quad_center_steps(10, 5, 0, 1.6)
    assert steps == [0, 1, 2, 4, 7] and abs(p - 1.42) < 1e-9
    # p = 1.2 succeeds at once: 10 (k/5)^1.2 = 0, 1.45, 3.33, 5.41, 7.65, 10 -> [0, 1, 3, 5, 7]
    assert _full_steps(deepcache_refresh_steps(10, interval=2, power=1.2, center=0)) == [0, 1, 3, 5, 7]
    # centre > 0: the complex first point, as the authors' code computes it
    for steps, interval, center, power in ((50, 3, 15, 1.4), (50, 5, 15, 1.4), (20, 4, 5, 1.2),
                                           (100, 10, 40, 1.3)):
        expected = _quad_center_by_the_authors(steps, -(-steps // interval), center, power)
        full = _full_steps(deepcache_refresh_steps(steps, interval=interval, power=power, center=center))
        assert full == sorted(set(expected)), (steps, interval, center, power)
    assert _full_steps(deepcache_refresh_steps(50, interval=5, power=1.4, center=15)) == [
        0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    with pytest.raises(ValueError, match="no power in"):
        deepcache_refresh_steps(10, interval=2, power=1.0, center=0)
    with pytest.raises(ValueError, match="needs both power= and center="):
        deepcache_refresh_steps(10, interval=2, power=1.2)


def test_noise_injection_where_t_over_T_is_below_tau():
    vp = schedules.vp_linear()  # T = t_max = 1; alpha^2 + sigma^2 = 1
    plan = encoder_propagation_plan(NET, 20, parallel=True, noise_injection=0.003)
    grid = np.linspace(vp.t_max, vp.t_min, 21)  # step starts 1, 0.95, ..., 0.05
    injection = plan.injection.coefficients(vp, grid)
    np.testing.assert_allclose(injection, [0] * 11 + [0.003] * 9, rtol=1e-6)  # t = 0.5 is not < 0.5
    tau = encoder_propagation_plan(NET, 20, noise_injection=0.003, tau=0.8)
    np.testing.assert_allclose(tau.injection.coefficients(vp, grid), [0] * 5 + [0.003] * 15, rtol=1e-6)
    sd = schedules.vp_discrete("scaled_linear")  # Stable Diffusion's DDIM-50 timesteps, T = 1000
    ts = np.append(np.arange(0, 1000, 20)[::-1] + 1, 0.0)  # 981, 961, ..., 1 then 0
    injection = encoder_propagation_plan(NET, 50, noise_injection=0.003).injection.coefficients(sd, ts)
    np.testing.assert_array_equal(injection > 0, ts[:-1] / 1000 < 0.5)
    assert (injection > 0).sum() == 25


def test_parallel_injection_comes_after_the_chunk_model_call(model):
    """Refreshing every step, DDIM on EDM's schedule: x_{i+1} = D + (s_{i+1}/s_i)(y - D),
    y = x_i + c_i x_T. Sequential: D = D(y). Parallel: the network F sees x_i, the
    preconditioning's skip term the state y: D = c_skip y + c_out F(c_in x_i) = D(x_i) +
    c_skip (y - x_i), c_skip = 0.25 / (sigma^2 + 0.25)."""
    denoiser, v, noise, labels = model
    grid = np.asarray(schedules.time_grid(SCHEDULE, STEPS, "edm"))
    scale = np.sqrt(1 + grid[:-1] ** 2)
    c = np.where(grid[:-1] / SCHEDULE.t_max < 0.5, 0.3 * scale / scale[0], 0.0)
    d = jax.jit(lambda x, s: denoiser.apply(v, x, jnp.full((2,), s), labels))
    expected, x_T = {}, grid[0] * noise
    for parallel in (True, False):
        x = x_T
        for i in range(STEPS):
            injected = x + c[i] * x_T
            den = d(injected, grid[i])
            if parallel:
                den = d(x, grid[i]) + 0.25 / (grid[i] ** 2 + 0.25) * (injected - x)
            x = den + (grid[i + 1] / grid[i]) * (injected - den)
        expected[parallel] = x
    assert float(jnp.abs(expected[True] - expected[False]).max()) > 1e-3  # the order matters
    for parallel in (True, False):
        plan = encoder_propagation_plan(NET, STEPS, every=1, parallel=parallel, noise_injection=0.3)
        np.testing.assert_allclose(_with_plan(model, plan, "ddim"), expected[parallel], atol=3e-5)


def test_plans_that_cannot_apply_say_so(model):
    denoiser, v, noise, labels = model
    run = denoiser_run_fn(denoiser, v, labels)
    call = lambda plan, sampler, steps=STEPS: sample_with_plan(
        run, noise, plan=plan, config=NET, schedule=SCHEDULE, sampler=sampler, steps=steps,
        prediction="x0", key=jax.random.key(0))
    with pytest.raises(ValueError, match="parallel decoding needs one model call per step"):
        call(encoder_propagation_plan(NET, STEPS, key_steps=(0, 3), parallel=True), "edm_heun")
    with pytest.raises(ValueError, match="cannot run with a feature cache") as error:
        call(encoder_propagation_plan(NET, STEPS, key_steps=(0, 3)), "euler_maruyama")
    listed = str(error.value).split("samplers that can on this schedule: ")[1]
    assert {"ddim", "deis_tab", "ipndm", "dpmpp_2m", "edm_heun"} <= set(listed.replace("'", "").split(", "))
    assert "euler_maruyama" not in listed and "rf_euler" not in listed
    with pytest.raises(ValueError, match="has 8 steps, the grid 5"):
        call(encoder_propagation_plan(NET, STEPS, key_steps=(0, 3)), "ddim", steps=5)
    with pytest.raises(ValueError, match="step 0 must refresh"):
        encoder_propagation_plan(NET, STEPS, key_steps=(2, 4))


# SiT declares its transformer blocks as feature nodes: the same plans run on it.
SIT = SiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2,
                num_classes=3, class_dropout_prob=0.0, learn_sigma=False)
SIT_GRAPH = SIT.feature_graph(encoder_depth=2)  # Faster Diffusion's DiT setting: 2 encoder blocks


def _sit_samples(plan=None):
    """DDIM on the rectified-flow path with a random-weight SiT (velocity, SiT time t = 1 - s),
    plainly (`SiT.__call__`) or through `sample_with_plan` with `sit_run_fn`."""
    model = SiT(SIT)
    noise, y = jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), jnp.array([0, 2])
    shapes = jax.eval_shape(model.init, jax.random.key(1), noise, jnp.ones(2), y)
    rng = np.random.default_rng(0)
    v = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, s.dtype), shapes)

    run = sit_run_fn(model, v, y)  # SiT.run in difflax time, the velocity's sign flipped
    options = dict(schedule=schedules.rectified_flow(), sampler="ddim", steps=STEPS,
                   prediction="velocity")
    if plan is None:
        return jax.jit(lambda n: sample(lambda x, s: -model.apply(v, x, 1.0 - s, y), n,
                                        **options)[0])(noise)
    return jax.jit(lambda n: sample_with_plan(run, n, plan=plan, config=SIT_GRAPH, **options)[0])(noise)


def test_plans_run_on_sit_through_the_same_code():
    plain = _sit_samples()
    np.testing.assert_array_equal(_sit_samples(full_plan(STEPS)), plain)
    plan = encoder_propagation_plan(SIT_GRAPH, STEPS, key_steps=(0, 2, 4, 6))
    assert plan.nodes == {"blocks.0", "blocks.1"}
    sequential = _sit_samples(plan)
    parallel = _sit_samples(encoder_propagation_plan(SIT_GRAPH, STEPS, key_steps=(0, 2, 4, 6),
                                                     parallel=True))
    np.testing.assert_allclose(parallel, sequential, atol=2e-5)
    assert float(jnp.abs(sequential - plain).max()) > 1e-3  # the reuse is real
    cost = plan_cost(SIT_GRAPH, plan, 1)
    assert (cost.node_evaluations["blocks.0"], cost.node_evaluations["blocks.3"]) == (4, STEPS)
    with pytest.raises(ValueError, match="no skip connections"):
        deepcache_plan(SIT_GRAPH, STEPS, interval=2)

