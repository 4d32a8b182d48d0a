"""The feature cache shared by every feature-reuse method: plans, their cost, and the sampler.

Faster Diffusion (encoder propagation), DeepCache (deep-branch reuse) and A-SDM (feature
inheritance) skip network computation by reusing features from earlier sampling steps. Each
is a `FeaturePlan` over a network's feature graph (difflax.models.graph): a set of cached
nodes and the steps that refresh them. At a refresh step the nodes are recomputed (at the
step's first model call) and stored; at the other steps every model call takes them from the
cache, and the network computes only what still depends on fresh input. This module holds
what the three share: the plan type (`FeaturePlan`, `full_plan`), its honest cost in model
calls and FLOPs (`plan_cost`, `PlanCost`, `node_flops`), and the solver that runs a plan
(`FeatureReuseSolver`, `sample_with_plan`), with parallel decoding of a refresh step's chunk
and the addition of the initial noise a plan asks for. The plans themselves are in
difflax.accel: `faster_diffusion`, `deepcache`, `asdm`.

The network is given as a run function (`RunFn`): `denoiser_run_fn` for EDM's denoisers,
`difflax.models.sd_unet.sd_run_fn` for Stable Diffusion's UNet. Plans name nodes of any graph
(`FeatureGraph`, or anything `difflax.models.feature_graph` accepts: a `UNetConfig`,
`SiTConfig`, `SDUNetConfig`, a denoiser, an `SDUNet`).

Steps are counted, never looked up by time value (repeated times would break that).
`sample_with_plan` runs any plan with the cache-capable samplers (those whose solver declares
`calls_per_step`, `cache_capable_samplers`: the exponential multistep family, DDIM, DEIS tAB /
rhoAB / log-rho, iPNDM, DPM-Solver(++); and EDM Heun) under `jit`, and reports model calls
honestly (`PlanCost`).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jax.extend.core import jaxpr_as_fun
import numpy as np

from difflax.models.graph import feature_graph, nodes_to_compute
from difflax.models.precond import Denoiser
from difflax.samplers.solve import SAMPLERS, make_grid, make_solver, solve
from difflax.samplers.term import AbstractGridSolver, DiffusionTerm, unwrap

# ----------------------------------------------------------------------------
# Plans.


@dataclasses.dataclass(frozen=True)
class FeaturePlan:
    """Which feature nodes are cached, and which steps refresh them.

    nodes: names of the network's feature graph ("<node>.attn" for attention units);
    refresh: (steps,) bools, True where the step recomputes and stores `nodes` (step 0 must);
    parallel: decode the non-refresh steps after each refresh step together with it, in one
    batched decoder call (needs the whole encoder + middle cached and one model call a step);
    injection: None, or what adds the initial state x_T to the state before each step: an
    object with `coefficients(schedule, grid) -> (steps,)` weights of x_T (Faster Diffusion's
    prior noise injection, `difflax.accel.faster_diffusion.PriorNoiseInjection`);
    max_decode_batch: with parallel decoding, at most this many latents per batched decoder
    call (a chunk of k steps at batch B decodes k x B latents: the chunk is split into equal
    pieces of whole steps, run in sequence); None decodes each chunk in one call, as the
    paper's code. It bounds memory; compute grows only when k is not a multiple of the
    pieces (the last piece is padded by repeating its last step, fewer steps than a piece).
    An empty `nodes` is the plain model: every call computes everything.
    """

    nodes: frozenset
    refresh: tuple
    parallel: bool = False
    injection: object | None = None
    name: str = "plan"
    max_decode_batch: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "nodes", frozenset(self.nodes))
        object.__setattr__(self, "refresh", tuple(bool(r) for r in self.refresh))
        if self.nodes and not self.refresh[0]:
            raise ValueError(f"{self.name}: step 0 must refresh the cache (it starts empty)")
        if self.max_decode_batch is not None and (not self.parallel or self.max_decode_batch < 1):
            raise ValueError(f"{self.name}: max_decode_batch={self.max_decode_batch} needs "
                             "parallel=True and a positive number of latents")

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
    names = tuple(n.name for n in nodes[:-1])
    store, consts = _hoisted(lambda x: run_fn(x, t, store=names), x)
    _, cache = store(consts, x)
    flops = {}
    for node in nodes:
        reuse = frozenset(node.inputs) - {"input"}
        out = node.name == "out"
        fn = lambda x, c, reuse=reuse, node=node, out=out: run_fn(
            x, t, cache=c, reuse=reuse, store=() if out else (node.name,), output=out)
        c = {k: cache[k] for k in reuse}
        g, consts = _hoisted(fn, x, c)
        cost = g.lower(consts, x, c).compile().cost_analysis()
        flops[node.name] = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    return flops


def _hoisted(fn, *args):
    """(g, consts), g jitted with g(consts, *args) == fn(*args): the arrays fn closes over (a
    run_fn's parameters: 3.4 GB for SD 1.5's UNet) reach XLA as arguments, not as constants
    compiled into the program."""
    closed, out = jax.make_jaxpr(fn, return_shape=True)(*args)

    def g(consts, *a):
        flat = jaxpr_as_fun(closed.replace(consts=consts))(*jax.tree.leaves(a))
        return jax.tree.unflatten(jax.tree.structure(out), flat)

    return jax.jit(g), closed.consts


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
    parallel decoding the chunk's F's are decoded there in one batched call (or in pieces of
    at most `max_decode_batch` latents) and kept in cache["out"] (k_max, B, ...).
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
    max_decode_batch: int | None = eqx.field(static=True, default=None)

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
        per_call = k if self.max_decode_batch is None else max(1, self.max_decode_batch // b)
        pieces = -(-k // per_call)
        size = -(-k // pieces)
        times = jax.lax.dynamic_slice(self.inner.times, (i,), (k,)).astype(cache["out"].dtype)
        times = jnp.pad(times, (0, pieces * size - k), mode="edge").reshape(pieces, size)
        tiled = jax.tree.map(lambda v: jnp.tile(v, (size,) + (1,) * (v.ndim - 1)), stored)

        def decode(piece_times):
            return self.run_fn(None, jnp.repeat(piece_times, b), cache=tiled, reuse=self.nodes,
                               store=frozenset({"out"}), output=False)[1]["out"]

        f = decode(times[0])[None] if pieces == 1 else jax.lax.map(decode, times)
        f = f.reshape((pieces * size, b) + f.shape[2:])[:k]
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
    injection = (np.zeros(n) if plan.injection is None
                 else np.asarray(plan.injection.coefficients(schedule, grid), np.float64))
    return tuple(sizes), chunk_kind, position, injection


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
    node names are checked against it). A plan's noise injection (`FeaturePlan.injection`)
    adds its weight times the initial state x_T before each step's model call, as Faster
    Diffusion's code does, but with parallel decoding after the chunk's batched call (their
    `register_parallel_pipeline`): the network sees the state without it (a preconditioned
    denoiser's c_skip x term takes the injected state, as for any reused F).

    Returns (samples, PlanCost). Works under `jax.jit`.
    """
    g = make_grid(schedule, sampler, steps, grid)
    if plan.steps != len(g) - 1:
        raise ValueError(f"plan {plan.name!r} has {plan.steps} steps, the grid {len(g) - 1}")
    graph = feature_graph(config)
    graph.check_names(plan.nodes, plan.name)
    inner, _ = make_solver(schedule, sampler, g, prediction=prediction, key=key, **options)
    calls = getattr(inner, "calls_per_step", None)
    if plan.nodes and calls is None:
        raise ValueError(f"{sampler} cannot run with a feature cache (its solver declares no "
                         "calls_per_step); samplers that can on this schedule: "
                         + ", ".join(map(repr, cache_capable_samplers(schedule, g, prediction))))
    if plan.parallel and (calls != 1 or not set(graph.names("encoder", "middle")) <= plan.nodes):
        raise ValueError(f"parallel decoding needs one model call per step ({sampler} makes "
                         f"{calls}) and the whole encoder + middle cached")
    sizes, chunk_kind, position, injection = _tables(plan, schedule, g)
    solver = FeatureReuseSolver(inner=inner, run_fn=run_fn, nodes=plan.nodes, chunk_sizes=sizes,
                                refresh=jnp.asarray(plan.refresh), chunk_kind=jnp.asarray(chunk_kind),
                                position=jnp.asarray(position), injection=jnp.asarray(injection),
                                inject=plan.injection is not None,
                                max_decode_batch=plan.max_decode_batch)
    samples = solve(lambda x, t: run_fn(x, t)[0], noise, schedule=schedule, solver=solver, grid=g,
                    prediction=prediction)
    return samples, plan_cost(config, plan, calls or 1)
