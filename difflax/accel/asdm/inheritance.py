"""A-SDM feature inheritance: features of the previous step reused at three granularities.

Zhu et al., "A-SDM: Accelerating Stable Diffusion through Model Assembly and Feature
Inheritance Strategies" (2024), Sec. 3 (feature inheritance). No public code: this is our
reading of the paper's text. A step inherits some features from the previous step instead of
computing them, at *block* granularity (a whole resolution level of the encoder or the
decoder: a group of the feature graph), *layer* granularity (one residual block: a node) or
*unit* granularity (the attention unit inside a block: its residual is inherited, the
convolutions recomputed), with time-step modes choosing where inheritance may happen (every
k-th step refreshes, within a window of the trajectory). The plan is a
`difflax.samplers.FeaturePlan` over the network's feature graph, run by
`difflax.samplers.sample_with_plan`.
"""
from __future__ import annotations

from typing import Sequence

from difflax.models.graph import feature_graph
from difflax.samplers.cached import FeaturePlan

GRANULARITIES = ("block", "layer", "unit")


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
