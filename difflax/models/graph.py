"""The feature graph: a network's forward pass declared as data, run with a feature cache.

A network that supports feature reuse declares its forward pass as a `FeatureGraph`: a
tuple of typed `FeatureNode`s in execution order, each naming the nodes it reads. Every
feature-reuse method (Faster Diffusion's encoder propagation, DeepCache's deep branch,
A-SDM's feature inheritance, in difflax.accel; the cache's sampler in
`difflax.samplers.cached`) and the diagnostics of
`difflax.accel.feature_similarity` are written against this graph only: "the encoder
nodes", "the node feeding the block that reads skip k", "the nodes of group g". They never
see a network's config, so a network that declares a graph gets every plan.

A network module implements the protocol of `run_graph`: `input_state(x)` (the value of the
"input" node) and `compute_node(node, values, context, scales, attention, train)` (a node's
value from its inputs' values). `run_graph` then computes only the nodes the output and the
stored nodes depend on, taking the nodes named in `reuse` from the cache.
A model config declares its graph by a `feature_graph()` method (`feature_graph(model)`).
"""
from __future__ import annotations

from typing import NamedTuple

KINDS = ("encoder", "middle", "decoder", "output")


class FeatureNode(NamedTuple):
    """One cacheable node of a forward pass.

    name: unique, e.g. "enc.16x16_block0" (EDM UNets) or "blocks.3" (SiT); "out" is the
      network output. The name "input" is reserved for the network input.
    kind: "encoder", "middle", "decoder" or "output" (see `KINDS`). Encoder propagation
      caches the encoder and middle nodes.
    op: what the node computes, in the network's terms (UNet: "conv", "down", "block", "up";
      SiT: "block"; "output" for the output node).
    inputs: the names of the nodes it reads ("input" for the network input). A node reading
      a skip connection has its main input first, the skip second.
    resolution, channels: of its output where meaningful (None otherwise).
    attention: it has an attention unit, whose residual is cacheable as f"{name}.attn".
    group: the coarse block it belongs to (UNet: one resolution level of one path, "enc.16x16";
      SiT: "blocks"); A-SDM's block-granularity inheritance reuses whole groups.
    index: its position within its group.
    module: the network's key for the node's layer (UNet: "16x16_block0" in `enc` / `dec`).
    """

    name: str
    kind: str
    op: str
    inputs: tuple
    resolution: int | None = None
    channels: int | None = None
    attention: bool = False
    group: str = ""
    index: int = 0
    module: str = ""


class FeatureGraph(tuple):
    """A forward pass: a tuple of `FeatureNode`s in execution order, the last one "out"."""

    def __new__(cls, nodes):
        nodes = tuple(nodes)
        names = [n.name for n in nodes]
        if not nodes or nodes[-1].name != "out" or len(set(names)) != len(names):
            raise ValueError(f"a feature graph lists unique nodes ending with 'out', got {names}")
        for node in nodes:
            if node.kind not in KINDS:
                raise ValueError(f"node {node.name!r}: unknown kind {node.kind!r}; valid: {KINDS}")
        return super().__new__(cls, nodes)

    def names(self, *kinds: str) -> tuple[str, ...]:
        """Names of the nodes of the given kinds (all kinds if none given), in order."""
        return tuple(n.name for n in self if not kinds or n.kind in kinds)

    @property
    def skips(self) -> tuple[FeatureNode, ...]:
        """The nodes read as skip connections (a later node's second input), in order."""
        read = {name for n in self for name in n.inputs[1:]}
        return tuple(n for n in self if n.name in read)

    def skip_reader(self, index: int) -> FeatureNode:
        """The node that reads skip connection `index` (0: the first skip, at the top)."""
        if not self.skips:
            raise ValueError("this feature graph has no skip connections (no node reads one)")
        if not 0 <= index < len(self.skips):
            raise ValueError(f"{index} is not a skip index; valid: 0..{len(self.skips) - 1}")
        return next(n for n in self if self.skips[index].name in n.inputs[1:])

    @property
    def groups(self) -> tuple[str, ...]:
        """The distinct groups of the non-output nodes, in order."""
        return tuple(dict.fromkeys(n.group for n in self if n.kind != "output"))

    @property
    def units(self) -> tuple[str, ...]:
        """The cacheable attention units, "<node>.attn"."""
        return tuple(n.name + ".attn" for n in self if n.attention)

    def check_names(self, names, what: str):
        """Raises a ValueError naming the unknown entries of `names` and some valid ones."""
        bad = sorted(set(names) - set(self.names()) - set(self.units))
        if bad:
            raise ValueError(f"{what}: unknown feature nodes {bad}; valid names are the nodes of "
                             f"the model's feature graph (e.g. {self[0].name!r}, "
                             f"{self[-2].name!r}, 'out') and '<node>.attn' for attention units")


def feature_graph(model) -> FeatureGraph:
    """The graph a model declares: a `FeatureGraph` itself, or a config with a
    `feature_graph()` method (`UNetConfig`, `SiTConfig`, `SDUNetConfig`), or what holds one as
    its `net` (a denoiser) or its `config` (a network module, e.g. `SDUNet`)."""
    if isinstance(model, FeatureGraph):
        return model
    graph = declared(model, "feature_graph")
    if graph is not None:
        return graph
    raise TypeError(f"{type(model).__name__} declares no feature graph: pass a FeatureGraph or "
                    "a config with a feature_graph() method (UNetConfig, SiTConfig, SDUNetConfig)")


def declared(model, method: str):
    """What a model declares by a config method (`feature_graph`, `block_params`): the
    method's result on `model` itself, or on what holds the config as its `net` (a denoiser)
    or its `config` (a network module); None if none of them has the method."""
    for holder in (model, getattr(model, "net", None), getattr(model, "config", None)):
        declare = getattr(holder, method, None)
        if declare is not None:
            return declare()
    return None


def nodes_to_compute(nodes, reuse=frozenset(), store=frozenset(), output=True) -> frozenset:
    """The nodes a run must compute: those the output (if `output`) and the stored nodes
    depend on, stopping at nodes taken from the cache (`reuse`). Unit names
    ("<node>.attn") in `store` make their block computed."""
    inputs = {n.name: n.inputs for n in nodes}
    needed = set()
    stack = (["out"] if output else []) + [name.removesuffix(".attn") for name in store]
    while stack:
        name = stack.pop()
        if name in reuse or name in needed or name == "input":
            continue
        needed.add(name)
        stack.extend(inputs[name])
    return frozenset(needed)


def check_skip_scales(skip_scales, graph: FeatureGraph) -> dict:
    """{skip node name: scale or None}, one entry per skip of `graph`."""
    n = len(graph.skips)
    if skip_scales is None:
        skip_scales = (None,) * n
    if len(skip_scales) != n:
        raise ValueError(f"skip_scales has {len(skip_scales)} entries but the network has {n} "
                         "skip connections; list them with difflax.models.skip_connections(config)")
    return {node.name: skip_scales[i] for i, node in enumerate(graph.skips)}


def run_graph(network, graph: FeatureGraph, x, context, *, cache=None, reuse=(), store=(),
              output=True, skip_scales=None, train=False):
    """The forward pass of `network` over `graph` with a feature cache.

    x: the network input (None when no computed node reads it); context: what every node
    sees besides its inputs (a UNet's time embedding (B, E)); cache: {name: value} holding
    every name in `reuse`; store: names (nodes, "<node>.attn" units) whose values to return;
    skip_scales: one scale (or None) per skip connection, in `graph.skips` order.
    Returns (the "out" node's value or None if not `output`, {name: value} for `store`).
    With nothing reused it is exactly the plain forward pass.
    """
    reuse, store = frozenset(reuse), frozenset(store)
    graph.check_names(reuse | store, "reuse/store")
    compute = nodes_to_compute(graph, reuse, store, output)
    scales = check_skip_scales(skip_scales, graph)
    values, stored = {}, {}
    if any("input" in n.inputs for n in graph if n.name in compute):
        if x is None:
            raise ValueError("this run computes nodes that read the input, so it needs the input x")
        values["input"] = network.input_state(x)
    for node in graph:
        unit = node.name + ".attn"
        if node.name in reuse:
            values[node.name] = cache[node.name]
        elif node.name in compute:
            values[node.name], attention = network.compute_node(
                node, values, context, scales, cache[unit] if unit in reuse else None, train)
            if unit in store:
                stored[unit] = attention
    stored.update({name: values[name] for name in store if name in values})
    return (values["out"] if output else None), stored
