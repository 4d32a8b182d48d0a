"""How much each feature of a network changes between adjacent sampling steps: the quantity
that feature reuse rests on.

Faster Diffusion (Li et al. 2024, Sec. 3.1, Fig. 2-3) motivates encoder propagation by
observing that the encoder's features change little between adjacent time steps while the
decoder's change a lot; DeepCache and A-SDM argue from the same kind of similarity. Here,
for one sampling trajectory x_0, x_1, ... (the states at which the sampler calls the model),
every node of the network's feature graph (difflax.models.graph) is computed at each step
and compared with the previous step, per sample:

    cosine_i = <f_{i+1}, f_i> / (|f_{i+1}| |f_i|),   change_i = |f_{i+1} - f_i| / |f_i|

with f the node's output flattened per sample (all its tensors, e.g. NCSN++'s aux path), averaged over the batch. A trajectory from a
single-step sampler comes from `difflax.samplers.flow.euler_trajectory` (Euler on the
EDM schedule, prediction "x0", is DDIM).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from difflax.models.graph import feature_graph

__all__ = ["FeatureSimilarity", "adjacent_step_similarity"]

KINDS = ("encoder", "middle", "decoder")


class FeatureSimilarity(NamedTuple):
    """Per-node similarity between adjacent steps of one trajectory.

    names, kinds: (K,) node names and kinds ("encoder", "middle", "decoder");
    cosine, relative_change: (N - 1, K) float64, row i comparing step i + 1 with step i.
    """

    names: tuple
    kinds: tuple
    cosine: np.ndarray
    relative_change: np.ndarray

    def mean(self, kind: str, quantity: str = "cosine") -> np.ndarray:
        """(N - 1,) average of `quantity` ("cosine" or "relative_change") over the nodes of
        `kind`, each node weighted equally."""
        if kind not in KINDS:
            raise ValueError(f"unknown node kind {kind!r}; valid choices: {', '.join(KINDS)}")
        if quantity not in ("cosine", "relative_change"):
            raise ValueError(f"unknown quantity {quantity!r}; valid choices: cosine, relative_change")
        columns = [j for j, k in enumerate(self.kinds) if k == kind]
        return getattr(self, quantity)[:, columns].mean(axis=1)


def _flat(value):
    """A node's value (an array, or a tuple of arrays and Nones) as (B, features) float32."""
    return jnp.concatenate([v.reshape(v.shape[0], -1).astype(jnp.float32)
                            for v in jax.tree.leaves(value)], axis=1)


def _compare(a, b):
    """(cosine, relative change) of b against a, per sample, averaged over the batch."""
    a, b = _flat(a), _flat(b)
    norm_a, norm_b = jnp.linalg.norm(a, axis=1), jnp.linalg.norm(b, axis=1)
    cosine = jnp.sum(a * b, axis=1) / (norm_a * norm_b)
    return jnp.mean(cosine), jnp.mean(jnp.linalg.norm(b - a, axis=1) / norm_a)


def adjacent_step_similarity(run_fn, model, states, times) -> FeatureSimilarity:
    """Cosine similarity and relative change of every feature node between adjacent steps.

    run_fn: the model with its feature cache, `run_fn(x, t, store=..., output=False)` as
      `difflax.accel.denoiser_run_fn` gives it (labels bound there);
    model: the network's feature graph or what declares it (a `UNetConfig`); states: (N, B, ...) the states the model is evaluated at, in
      step order; times: (N,) their times (the schedule's, e.g. sigma).
    Returns a :class:`FeatureSimilarity` of N - 1 rows. Runs as one jitted scan over the steps.
    """
    nodes = [n for n in feature_graph(model) if n.kind in KINDS]
    names = tuple(n.name for n in nodes)
    states = jnp.asarray(states)
    times = jnp.asarray(times, states.dtype)
    if states.shape[0] != times.shape[0] or states.shape[0] < 2:
        raise ValueError(f"need >= 2 states and one time per state, got {states.shape[0]} states "
                         f"and {times.shape[0]} times")

    def features(x, t):
        return run_fn(x, jnp.full((x.shape[0],), t), store=names, output=False)[1]

    def step(prev, xt):
        cur = features(*xt)
        pairs = [_compare(prev[name], cur[name]) for name in names]
        return cur, (jnp.stack([c for c, _ in pairs]), jnp.stack([r for _, r in pairs]))

    @jax.jit
    def run(states, times):
        return jax.lax.scan(step, features(states[0], times[0]), (states[1:], times[1:]))[1]

    cosine, change = run(states, times)
    return FeatureSimilarity(names, tuple(n.kind for n in nodes), np.asarray(cosine, np.float64),
                             np.asarray(change, np.float64))
