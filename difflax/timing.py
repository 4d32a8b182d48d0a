"""Wall time for the benchmarks in experiments/: candidates timed in interleaved rounds.

On a machine shared with other work, a burst of load slows whatever runs during it. Calling
each candidate once per round, in turn, exposes all of them to the same bursts, and the ratio
of two candidates within one round cancels most of the burst: the benchmarks report the
median over rounds of such per-round ratios, with their interquartile range
(`ratio_summary`), rather than a ratio of separately taken medians.

    timings = interleaved_times({"plain": plain_fn, "cached": cached_fn}, rounds=10)
    median, q25, q75 = ratio_summary(timings["plain"].wall / timings["cached"].wall)

A candidate is a zero-argument callable returning JAX arrays (blocked on before the clock
stops) or anything else (PyTorch on the CPU is synchronous); its first call, untimed, compiles.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """One candidate's rounds: wall and process-CPU seconds, (rounds,) each, and the output
    of its warm-up call."""

    wall: np.ndarray
    cpu: np.ndarray
    output: Any


def interleaved_times(fns: Mapping[str, Callable[[], Any]], rounds: int, *,
                      warmup: bool = True) -> dict[str, Timing]:
    """{name: Timing} of each zero-argument fn: one warm-up call each, then `rounds` rounds in
    which every fn runs once, in the mapping's order. `warmup=False` skips the warm-up calls
    (for fns compiled ahead of time, `jax.jit(f).lower(...).compile()`, when one call is too
    long to spend untimed); Timing.output is then the first round's."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: must be an integer >= 1")
    outputs = {name: jax.block_until_ready(fn()) for name, fn in fns.items()} if warmup else {}
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            out = jax.block_until_ready(fn())
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            outputs.setdefault(name, out)
    return {name: Timing(np.asarray(wall[name]), np.asarray(cpu[name]), outputs[name])
            for name in fns}


def ratio_summary(ratios) -> tuple[float, float, float]:
    """(median, 25th, 75th percentile) of per-round ratios, (rounds,)."""
    q25, median, q75 = np.percentile(np.asarray(ratios, np.float64), [25, 50, 75])
    return float(median), float(q25), float(q75)
