"""Feature reuse across sampling steps: one static plan over a network's feature cache.

Three papers skip network computation by reusing features from earlier steps. Here each is
a `FeaturePlan` over a network's feature graph (difflax.models.graph; run with a cache by
`Denoiser.run`): a set of cached nodes and the steps that refresh them. At a refresh step
the nodes are recomputed (at the step's first model call) and stored; at the other steps
every model call takes them from the cache, and the network computes only what still
depends on fresh input. The plans are written against the graph alone ("encoder nodes",
"the node feeding the reader of skip k", "the nodes of group g"), so they apply to every
network that declares one: pass them a `FeatureGraph` or anything that declares it (a
`UNetConfig`, a `SiTConfig`, an `SDUNetConfig`, a denoiser, an `SDUNet`), see
`difflax.models.feature_graph`; `difflax.models.sd_unet.sd_run_fn` is the run function of
Stable Diffusion's UNet, as `denoiser_run_fn` is of EDM's denoisers.

- Faster Diffusion (Li et al. 2024, "Rethinking the Role of UNet Encoder in Diffusion
  Models", code hutaiHang/Faster-Diffusion), Sec. 3.2-3.3: *encoder propagation* caches
  every skip tensor (the first convolution's output included) and the middle (bottleneck)
  output at key steps, 0, 1, 2, 3, 5, 10, 15, 25, 35 for DDIM with 50 steps, the same list
  cut to 0..15 for DPM-Solver with 20, the code's rules for 75 and 100 steps, and no default
  for other step counts (`faster_diffusion_key_steps`); non-key steps run the decoder only.
  *Parallel decoding*: a key step and the non-key steps up to the next key step form one UNet
  call, the decoder running once on the features tiled k times with the k steps' time
  embeddings (batch k x B); the sampler then updates with the k outputs one after another.
  *Prior noise injection*: z_t <- z_t + alpha z_T, alpha = 0.003, at steps with t / T < tau
  = 0.5 (the code: before each model call; in parallel mode after the chunk's batched call,
  before each of its updates).
- DeepCache (Ma et al. 2024, code horseee/DeepCache): cache the deep branch, the decoder
  state entering the block that concatenates skip branch m (counted from the top), at full
  steps; the other steps recompute only the shallow encoder blocks (down to skip m) and the
  shallow decoder. Full steps every N, or the code's non-uniform `sample_from_quad_center`
  (`deepcache_refresh_steps`, `quad_center_steps`); branch numbering in `deepcache_branch_node`.
- A-SDM feature inheritance (no public code; our reading of the paper's text): a step
  inherits some features from the previous step instead of computing them, at *block*
  granularity (a whole resolution level of the encoder or the decoder), *layer* granularity
  (one residual block) or *unit* granularity (the attention unit inside a block: its
  residual is inherited, the convolutions recomputed), with time-step modes choosing where
  inheritance may happen (every k-th step refreshes, within a window of the trajectory).

Steps are counted, never looked up by time value (repeated times would break that).
`sample_with_plan` runs any plan with the cache-capable samplers (those whose solver declares
`calls_per_step`, `cache_capable_samplers`: the exponential multistep family, DDIM, DEIS tAB /
rhoAB / log-rho, iPNDM, DPM-Solver(++); and EDM Heun) under `jit`, and reports model calls
honestly (`PlanCost`).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from difflax.models import Denoiser
from difflax.models.graph import feature_graph, nodes_to_compute
from difflax.samplers import SAMPLERS, make_grid, make_solver, solve
from difflax.samplers.term import AbstractGridSolver, DiffusionTerm, unwrap
from difflax.schedules import VPDiscrete

FASTER_DIFFUSION_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)
GRANULARITIES = ("block", "layer", "unit")

# ----------------------------------------------------------------------------
# Plans.


@dataclasses.dataclass(frozen=True)
class FeaturePlan:
    """Which feature nodes are cached, and which steps refresh them.

    nodes: names of the network's feature graph ("<node>.attn" for attention units);
    refresh: (steps,) bools, True where the step recomputes and stores `nodes` (step 0 must);
    parallel: decode the non-refresh steps after each refresh step together with it, in one
    batched decoder call (needs the whole encoder + middle cached and one model call a step);
    noise_injection: Faster Diffusion's alpha, added at the steps whose time has t / T <
    `injection_tau` (T the schedule's horizon, see `sample_with_plan`).
    An empty `nodes` is the plain model: every call computes everything.
    """

    nodes: frozenset
    refresh: tuple
    parallel: bool = False
    noise_injection: float = 0.0
    injection_tau: float = 0.5
    name: str = "plan"

    def __post_init__(self):
        object.__setattr__(self, "nodes", frozenset(self.nodes))
        object.__setattr__(self, "refresh", tuple(bool(r) for r in self.refresh))
        if self.nodes and not self.refresh[0]:
            raise ValueError(f"{self.name}: step 0 must refresh the cache (it starts empty)")

    @property
    def steps(self) -> int:
        return len(self.refresh)

    def chunks(self) -> list[tuple[int, int]]:
        """(refresh step, number of steps it covers up to the next refresh) pairs."""
        starts = [i for i, r in enumerate(self.refresh) if r] + [self.steps]
        return [(a, b - a) for a, b in zip(starts[:-1], starts[1:])]


def full_plan(steps: int) -> FeaturePlan:
    """Recompute everything at every step: the plain model."""
    return FeaturePlan(frozenset(), (True,) * steps, name="full")


def faster_diffusion_key_steps(steps: int) -> tuple[int, ...]:
    """The key steps of Faster Diffusion's code (hutaiHang/Faster-Diffusion, `utils_sd.py`).

    50 steps: 0 1 2 3 5 10 15 25 35 (its default rule "50ls", Sec. 4 DDIM); 20 steps: the same
    rule, 0 1 2 3 5 10 15 (DPM-Solver); 100 / 75 steps: its "100ls" / "75ls" rules, step i is
    a key step if i < 10, i % 5 == 0, or i > 85 (100) / i > 65 (75). Other step counts have
    no rule in the code: pass `key_steps=` or `every=` to `encoder_propagation_plan`.
    """
    if steps in (20, 50):
        return tuple(k for k in FASTER_DIFFUSION_KEY_STEPS if k < steps)
    if steps in (75, 100):
        last = 65 if steps == 75 else 85
        return tuple(i for i in range(steps) if i < 10 or i % 5 == 0 or i > last)
    raise ValueError(f"Faster Diffusion's code has key steps for 20, 50, 75 or 100 steps, not "
                     f"{steps}; pass key_steps= or every=")


def encoder_nodes(model) -> frozenset:
    """The encoder and middle nodes of the model's graph: for a UNet every skip tensor and
    the middle blocks' output."""
    return frozenset(feature_graph(model).names("encoder", "middle"))


def encoder_propagation_plan(model, steps: int, *, key_steps: Sequence[int] | None = None,
                             every: int | None = None, parallel: bool = False,
                             noise_injection: float = 0.0, tau: float = 0.5) -> FeaturePlan:
    """Faster Diffusion: encoder + middle at key steps only, the decoder at every step.

    Key steps: `key_steps`, or every `every`-th step (the paper's uniform ablation), or by
    default `faster_diffusion_key_steps(steps)`. `parallel=True` decodes each key step's
    chunk in one batched call; `noise_injection=0.003` is the paper's prior noise injection
    (Sec. 3.4), added at steps with t / T < `tau` (its code: t / 1000 < 0.5).
    """
    if key_steps is not None and every is not None:
        raise ValueError("pass key_steps= or every=, not both")
    if every is not None:
        key_steps = range(0, steps, int(every))
    keys = set(faster_diffusion_key_steps(steps) if key_steps is None else key_steps)
    if not keys <= set(range(steps)):
        raise ValueError(f"key steps {sorted(keys - set(range(steps)))} are outside 0..{steps - 1}")
    name = "encoder propagation" + (" + parallel" if parallel else "")
    return FeaturePlan(encoder_nodes(model), tuple(i in keys for i in range(steps)),
                       parallel=parallel, noise_injection=noise_injection, injection_tau=tau,
                       name=name)


def deepcache_branch_node(model, branch: int) -> str:
    """The node whose output enters the node that reads skip `branch` (0 = the top,
    full-resolution skip: a UNet's input convolution's output) as its main input:
    DeepCache's cached deep-branch feature.

    DeepCache's DDPM experiments (horseee/DeepCache, experiments/ddpm, `--branch b`) leave the
    input convolution out of the count: their branch b is difflax's branch b + 1 (their
    CIFAR / LSUN runs use b = 2, difflax's branch 3). With two residual blocks a level their
    code reads b as level b // 3, item b % 3 (items 0, 1 the blocks, 2 the downsampling).
    On Stable Diffusion (skips as `sd_skip_connections` lists them) their SD pipeline's
    `cache_layer_id=L, cache_block_id=b` is branch 1 + sum_{i<L} (layers_i + 1) + b (their SD
    1.5 runs, L = b = 0: branch 1), their `DeepCacheSDHelper(cache_branch_id=m)` branch m.
    """
    return feature_graph(model).skip_reader(branch).inputs[0]


def quad_center_steps(steps: int, num_full: int, center: int, power: float) -> tuple[list, float]:
    """DeepCache's `sample_from_quad_center` (horseee/DeepCache, sd/pipeline_stable_diffusion.py).

    num_full + 1 points evenly spaced from (-center)^(1/p) to (steps - center)^(1/p), raised to
    the power p and truncated to integers, their distinct values without the smallest and the
    largest, shifted by `center`, after step 0. For center > 0 the first point is Python's
    complex power of a negative number, and the integers are the real parts' truncations, as
    in the authors' code. p starts at `power` and is lowered by 0.02 until the list has
    `num_full` entries. Returns (full steps, p used); an error if p reaches 1.
    """
    p = float(power)
    while p > 1:
        ends = (-float(center)) ** (1 / p), (steps - float(center)) ** (1 / p)
        points = np.linspace(ends[0], ends[1], num_full + 1) ** p
        full = [0] + [int(v) + center for v in np.unique(np.real(points).astype(np.int32))[1:-1]]
        if len(full) == num_full:
            return full, p
        p -= 0.02
    raise ValueError(f"no power in (1, {power}] gives {num_full} full steps of {steps} around "
                     f"center {center}; lower center or raise interval")


def deepcache_refresh_steps(steps: int, *, interval: int, power: float | None = None,
                            center: int | None = None) -> tuple:
    """DeepCache's full steps as its code chooses them (`cache_interval`, `uniform`, `pow`,
    `center` of its pipelines): every `interval`-th step (uniform, its default), or with
    `power` and `center` the non-uniform `quad_center_steps(steps, ceil(steps / interval),
    center, power)` (the paper's Sec. 3.3 non-uniform 1:N strategy). (steps,) bools."""
    if int(interval) < 1:
        raise ValueError(f"interval must be a positive integer, got {interval}")
    if (power is None) != (center is None):
        raise ValueError("the non-uniform schedule needs both power= and center=")
    if power is None or interval == 1:
        full = range(0, steps, int(interval))
    else:
        if not 0 <= center < steps:
            raise ValueError(f"center must be a step in 0..{steps - 1}, got {center}")
        full, _ = quad_center_steps(steps, -(-steps // int(interval)), center, power)
    return tuple(i in full for i in range(steps))


def deepcache_plan(model, steps: int, *, branch: int = 0, **schedule) -> FeaturePlan:
    """DeepCache: cache the deep branch below skip `branch`; `schedule` as in
    `deepcache_refresh_steps` (interval=N, and power=, center= for the non-uniform one)."""
    return FeaturePlan(frozenset({deepcache_branch_node(model, branch)}),
                       deepcache_refresh_steps(steps, **schedule), name=f"DeepCache branch {branch}")


def inheritance_nodes(model, granularity: str, targets: Sequence[str]) -> frozenset:
    """A-SDM's inherited features. "block": groups of the graph (every node of the group;
    UNet: "dec.8x8" or "enc.16x16", one path at one resolution, the middle blocks counting
    as the decoder's); "layer": node names ("dec.8x8_block1"); "unit": node names whose
    attention unit is inherited."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; valid choices: {GRANULARITIES}")
    graph = feature_graph(model)
    if granularity == "block":
        unknown = sorted(set(targets) - set(graph.groups))
        if unknown:
            raise ValueError(f"unknown blocks {unknown}; valid: {', '.join(map(repr, graph.groups))}")
        return frozenset(n.name for n in graph if n.kind != "output" and n.group in targets)
    chosen = frozenset(t + ".attn" if granularity == "unit" else t for t in targets)
    graph.check_names(chosen, f"{granularity} inheritance")
    return chosen


def inheritance_plan(model, steps: int, *, granularity: str, targets: Sequence[str],
                     refresh_every: int = 2, window: tuple[float, float] = (0.0, 1.0)) -> FeaturePlan:
    """A-SDM feature inheritance: inside `window` (fractions of the trajectory) only every
    `refresh_every`-th step computes the targets, the others inherit them; outside it every
    step computes them. `refresh_every=2` is the alternating mode."""
    lo, hi = window
    inside = [lo * steps <= i < hi * steps for i in range(steps)]
    refresh, last = [], -steps
    for i in range(steps):
        fresh = not inside[i] or i - last >= refresh_every
        last = i if fresh else last
        refresh.append(fresh)
    return FeaturePlan(inheritance_nodes(model, granularity, targets), tuple(refresh),
                       name=f"inherit {granularity} {','.join(targets)}")


# ----------------------------------------------------------------------------
# Cost accounting.


@dataclasses.dataclass(frozen=True)
class PlanCost:
    """Model calls of one sampling run, per sample batch.

    full: calls computing every node; partial: calls computing some (or taking attention
    units from the cache); free: calls answered from the cache alone (parallel decoding, or
    the refresh's own output); batched_decodes: parallel-decoding calls, `decoded_steps`
    steps in total; node_evaluations: how often each node is computed (batched decodes count
    once per step), to weigh by node FLOPs (a block whose attention unit is reused still
    counts whole: `equivalent_nfe` overstates the cost of unit-level plans).
    """

    full: int
    partial: int
    free: int
    batched_decodes: int
    decoded_steps: int
    node_evaluations: dict

    def equivalent_nfe(self, node_flops: dict) -> float:
        """Compute spent, in units of one full evaluation, given FLOPs per node."""
        total = sum(node_flops.values())
        return sum(node_flops[n] * c for n, c in self.node_evaluations.items()) / total


def plan_cost(model, plan: FeaturePlan, calls_per_step: int) -> PlanCost:
    """The model calls `sample_with_plan` makes for `plan` on `model`'s feature graph,
    counted on the host."""
    nodes = feature_graph(model)
    everything = nodes_to_compute(nodes)
    counts = collections.Counter()
    tally = collections.Counter()

    units = any(name.endswith(".attn") for name in plan.nodes)

    def call(computed, reads_units=False):
        for name in computed:
            counts[name] += 1
        whole = computed == everything and not reads_units
        tally["full" if whole else "partial" if computed else "free"] += 1

    reuse = nodes_to_compute(nodes, reuse=plan.nodes)
    for start, length in plan.chunks() if plan.nodes else [(i, 1) for i in range(plan.steps)]:
        if not plan.nodes:
            for _ in range(calls_per_step):
                call(everything)
            continue
        if plan.parallel:
            call(nodes_to_compute(nodes, store=plan.nodes, output=False) | reuse)
            for name in reuse:
                counts[name] += length - 1
            tally["batched_decodes"] += 1
            tally["decoded_steps"] += length
            tally["free"] += length - 1
            continue
        call(everything)  # the refresh: stores the nodes, answers the first call
        for _ in range(calls_per_step * length - 1):
            call(reuse, reads_units=units)
    return PlanCost(full=tally["full"], partial=tally["partial"], free=tally["free"],
                    batched_decodes=tally["batched_decodes"], decoded_steps=tally["decoded_steps"],
                    node_evaluations=dict(counts))


def node_flops(model, run_fn, x, t) -> dict:
    """FLOPs of each node of `model`'s feature graph at input x (B, ...), t (B,): XLA's cost
    analysis of a run that computes that node alone from its cached inputs (one compile per
    node)."""
    nodes = feature_graph(model)
    _, cache = jax.jit(lambda x: run_fn(x, t, store=tuple(n.name for n in nodes[:-1])))(x)
    flops = {}
    for node in nodes:
        reuse = frozenset(node.inputs) - {"input"}
        out = node.name == "out"
        fn = lambda x, c, reuse=reuse, node=node, out=out: run_fn(
            x, t, cache=c, reuse=reuse, store=() if out else (node.name,), output=out)
        cost = jax.jit(fn).lower(x, {k: cache[k] for k in reuse}).compile().cost_analysis()
        flops[node.name] = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    return flops


# ----------------------------------------------------------------------------
# Sampling with a plan.

RunFn = Callable  # run_fn(x, t, *, cache=None, reuse=(), store=(), output=True) -> (pred, stored)


def denoiser_run_fn(denoiser: Denoiser, variables, labels=None, *, skip_scales=None) -> RunFn:
    """`Denoiser.run` as a model on the EDM schedule (t = sigma, x0 prediction). Labels (B,)
    are tiled to match batched decoding (k x B)."""

    def run(x, t, **kwargs):
        y = labels
        if labels is not None and denoiser.net.label_dim:
            y = jnp.tile(jnp.asarray(labels), t.shape[0] // jnp.shape(labels)[0])
        return denoiser.apply(variables, x, t, y if denoiser.net.label_dim else None,
                              skip_scales=skip_scales, method=Denoiser.run, **kwargs)

    return run


class _CachedTerm(DiffusionTerm):
    """The probability-flow term of one step, its model calls served from the cache."""

    run_fn: Callable = None
    cache: dict = None
    reuse: frozenset = eqx.field(static=True, default=frozenset())
    first_from_cache: jax.Array | None = None  # step's first call reads F ("out") from the cache

    def evaluate(self, x, t, call):
        if not self.reuse:
            return self.model_fn(x, t)
        partial = lambda: self.run_fn(x, t, cache=self.cache, reuse=self.reuse)[0]
        if call > 0 or self.first_from_cache is None:
            return partial()
        cached = lambda: self.run_fn(x, t, cache=self.cache, reuse=frozenset({"out"}))[0]
        return jax.lax.cond(self.first_from_cache, cached, partial)


class FeatureReuseSolver(AbstractGridSolver):
    """Runs `inner` (a cache-capable grid solver) with a `FeaturePlan` over `run_fn`.

    State: (step, (inner state, cache, x_T)). At a refresh step the plan's nodes (and the
    output F of that first call) are computed at `inner.first_point` and stored; with
    parallel decoding the chunk's F's are decoded there in one batched call and kept in
    cache["out"] (k_max, B, ...).
    """

    inner: AbstractGridSolver
    run_fn: Callable = eqx.field(static=True)
    nodes: frozenset = eqx.field(static=True)
    chunk_sizes: tuple = eqx.field(static=True)  # distinct parallel chunk sizes, k_max last
    refresh: jax.Array  # (N,) bool
    chunk_kind: jax.Array  # (N,) int: 0 no refresh, j+1 refresh of chunk_sizes[j]
    position: jax.Array  # (N,) int: step's index in its chunk
    injection: jax.Array  # (N,) float: coefficient of x_T added before the step
    inject: bool = eqx.field(static=True, default=False)

    def init(self, terms, t0, t1, y0, args):
        i, inner_state = self.inner.init(terms, t0, t1, y0, args)
        return i, (inner_state, self._empty_cache(y0, t0), y0)

    def _store(self):
        return self.nodes if self.chunk_sizes else self.nodes | {"out"}

    def _empty_cache(self, y0, t0):
        t = jnp.broadcast_to(jnp.asarray(t0, y0.dtype), y0.shape[:1])
        shapes = jax.eval_shape(lambda: self.run_fn(y0, t, store=self._store(), output=False)[1])
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        if self.chunk_sizes:
            cache["out"] = jnp.zeros((self.chunk_sizes[-1],) + y0.shape, y0.dtype)
        return cache

    def _refresh(self, i, x, cache):
        t, x = self.inner.first_point(i, x)
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        stored = self.run_fn(x, t, store=self._store(), output=False)[1]
        if not self.chunk_sizes:
            return stored
        branches = [lambda c: c] + [lambda c, k=k: self._decode_ahead(i, stored, k, c)
                                    for k in self.chunk_sizes]
        return jax.lax.switch(self.chunk_kind[i], branches, {**cache, **stored})

    def _decode_ahead(self, i, stored, k, cache):
        b = cache["out"].shape[1]
        times = jax.lax.dynamic_slice(self.inner.times, (i,), (k,))
        tiled = jax.tree.map(lambda v: jnp.tile(v, (k,) + (1,) * (v.ndim - 1)), stored)
        f = self.run_fn(None, jnp.repeat(times.astype(cache["out"].dtype), b), cache=tiled,
                        reuse=self.nodes, store=frozenset({"out"}), output=False)[1]["out"]
        f = f.reshape((k, b) + f.shape[1:])
        return {**cache, **stored, "out": cache["out"].at[:k].set(f.astype(cache["out"].dtype))}

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        i, (inner_state, cache, x_T) = solver_state
        term = unwrap(terms)
        x_model = y0  # parallel decoding: the chunk's model call sees the state before injection
        if self.inject:
            y0 = y0 + self.injection[i].astype(y0.dtype) * x_T
        if self.nodes:
            x_model = x_model if self.chunk_sizes else y0
            cache = jax.lax.cond(self.refresh[i], lambda c: self._refresh(i, x_model, c),
                                 lambda c: c, cache)
        step_cache, reuse, first = cache, self.nodes, self.refresh[i]
        if self.chunk_sizes:  # every call reads its F from the batched decode
            step_cache, reuse, first = {"out": cache["out"][self.position[i]]}, frozenset({"out"}), None
        step_term = _CachedTerm(term.model_fn, term.schedule, term.prediction, run_fn=self.run_fn,
                                cache=step_cache, reuse=reuse, first_from_cache=first)
        y1, inner_state = self.inner._step(step_term, i, y0, inner_state)
        return (y1, None, dict(y0=y0, y1=y1), (i + 1, (inner_state, cache, x_T)),
                diffrax.RESULTS.successful)


def _tables(plan: FeaturePlan, schedule, grid):
    """Host tables of the solver: chunk kinds, positions and noise-injection coefficients."""
    n = plan.steps
    chunk_kind, position = np.zeros(n, np.int32), np.zeros(n, np.int32)
    sizes = sorted({length for _, length in plan.chunks()}) if plan.parallel else []
    for start, length in plan.chunks():
        position[start:start + length] = np.arange(length)
        if plan.parallel:
            chunk_kind[start] = sizes.index(length) + 1
    return tuple(sizes), chunk_kind, position, noise_injection_coefficients(plan, schedule, grid)


def noise_injection_coefficients(plan: FeaturePlan, schedule, grid) -> np.ndarray:
    """(steps,) weights of the initial noise x_T added before each step (Faster Diffusion's
    prior noise injection): ``plan.noise_injection`` (times the state's scale relative to the
    first step's) where t / T < ``plan.injection_tau`` (T = the number of discrete steps on
    VP discrete schedules), else 0."""
    g = np.asarray(grid, np.float64)[:-1]
    scale = np.sqrt(np.asarray(schedule.alpha(g)) ** 2 + np.asarray(schedule.sigma(g)) ** 2)
    horizon = schedule.t_max + 1 if isinstance(schedule, VPDiscrete) else schedule.t_max
    return np.where(g / horizon < plan.injection_tau, plan.noise_injection * scale / scale[0], 0.0)


def cache_capable_samplers(schedule, grid, prediction: str = "x0") -> tuple[str, ...]:
    """The samplers whose solvers on `schedule` and `grid` (with default options) declare
    `calls_per_step`, the protocol `FeatureReuseSolver` runs on (model calls per step, the
    first at `first_point`): each sampler's solver is built to ask it."""
    capable = []
    for name in SAMPLERS:
        try:
            solver, _ = make_solver(schedule, name, grid, prediction=prediction, key=jax.random.key(0))
        except (ValueError, TypeError):
            continue
        if getattr(solver, "calls_per_step", None) is not None:
            capable.append(name)
    return tuple(capable)


def sample_with_plan(run_fn: RunFn, noise, *, plan: FeaturePlan, config, schedule,
                     sampler: str, steps: int | None = None, grid=None, prediction: str = "x0",
                     key=None, **options):
    """Samples like `difflax.sample`, with the network's features reused as `plan` says.

    run_fn: the model with its cache (`denoiser_run_fn`), in the schedule's time;
    config: the network's feature graph, or what declares it (a `UNetConfig`, `SiTConfig`;
    node names are checked against it). Prior noise injection
    adds alpha z_T to the state, z_T the initial state in variance-preserving units (x_T
    scaled by sqrt(alpha^2 + sigma^2) of the current step over that of the first), at the
    steps whose start time t has t / T < tau, T the schedule's horizon: the number of training
    steps N of `vp_discrete` (t is the step index, as Faster Diffusion's t / 1000), else t_max
    (on EDM's schedule, where t = sigma, that is sigma < tau sigma_max). As in the authors'
    code it comes before the step's model call, but with parallel decoding after the chunk's
    batched call (their `register_parallel_pipeline`): the network sees the state without it
    (a preconditioned denoiser's c_skip x term takes the injected state, as for any reused F).

    Returns (samples, PlanCost). Works under `jax.jit`.
    """
    g = make_grid(schedule, sampler, steps, grid)
    if plan.steps != len(g) - 1:
        raise ValueError(f"plan {plan.name!r} has {plan.steps} steps, the grid {len(g) - 1}")
    feature_graph(config).check_names(plan.nodes, plan.name)
    inner, _ = make_solver(schedule, sampler, g, prediction=prediction, key=key, **options)
    calls = getattr(inner, "calls_per_step", None)
    if plan.nodes and calls is None:
        raise ValueError(f"{sampler} cannot run with a feature cache (its solver declares no "
                         "calls_per_step); samplers that can on this schedule: "
                         + ", ".join(map(repr, cache_capable_samplers(schedule, g, prediction))))
    if plan.parallel and (calls != 1 or not encoder_nodes(config) <= plan.nodes):
        raise ValueError(f"parallel decoding needs one model call per step ({sampler} makes "
                         f"{calls}) and the whole encoder + middle cached")
    sizes, chunk_kind, position, injection = _tables(plan, schedule, g)
    solver = FeatureReuseSolver(inner=inner, run_fn=run_fn, nodes=plan.nodes, chunk_sizes=sizes,
                                refresh=jnp.asarray(plan.refresh), chunk_kind=jnp.asarray(chunk_kind),
                                position=jnp.asarray(position), injection=jnp.asarray(injection),
                                inject=plan.noise_injection != 0)
    samples = solve(lambda x, t: run_fn(x, t)[0], noise, schedule=schedule, solver=solver, grid=g,
                    prediction=prediction)
    return samples, plan_cost(config, plan, calls or 1)
