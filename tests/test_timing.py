"""difflax.timing: the order of the interleaved calls, what is timed, the ratio summary."""
import time

import numpy as np
import pytest

from difflax.timing import interleaved_times, ratio_summary


def test_calls_are_interleaved_after_one_warm_up_each():
    calls = []
    fns = {name: (lambda name=name: calls.append(name) or name) for name in ("a", "b", "c")}
    timings = interleaved_times(fns, rounds=3)
    assert calls == ["a", "b", "c"] * 4  # warm-up round, then three timed rounds
    assert {k: t.output for k, t in timings.items()} == {"a": "a", "b": "b", "c": "c"}
    assert all(t.wall.shape == t.cpu.shape == (3,) for t in timings.values())
    calls.clear()
    counter = iter(range(10))
    timings = interleaved_times({"a": lambda: calls.append("a") or next(counter)}, 2, warmup=False)
    assert calls == ["a", "a"] and timings["a"].output == 0  # no warm-up: the first round's


def test_wall_and_cpu_time_are_what_each_call_took():
    timings = interleaved_times({"sleep": lambda: time.sleep(0.02), "idle": lambda: None}, 4)
    assert np.all(timings["sleep"].wall >= 0.02)
    assert np.all(timings["idle"].wall < timings["sleep"].wall)
    # sleeping uses no CPU time (the median: a thread left by earlier tests may wake once)
    assert np.median(timings["sleep"].cpu) < 0.01


def test_ratio_summary_is_median_and_quartiles():
    assert ratio_summary([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, 2.0, 4.0)
    with pytest.raises(ValueError, match="rounds=0"):
        interleaved_times({"a": lambda: None}, 0)
