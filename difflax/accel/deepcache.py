"""DeepCache: reuse of the deep branch of a UNet between full steps.

Ma, Fang & Wang, "DeepCache: Accelerating Diffusion Models for Free" (CVPR 2024; code
horseee/DeepCache). A `difflax.samplers.FeaturePlan` over the network's feature graph
(difflax.models.graph), run by `difflax.samplers.sample_with_plan` (or the sampling
factory's `plan=`), so it applies to every network whose graph has skip connections (EDM
UNets, SD's UNet).

- Sec. 3 (cacheable features along the skip branch m): at a full step the UNet runs
  whole and the deep branch, the decoder state entering the block that concatenates skip
  branch m (counted from the top), is cached (`deepcache_branch_node`); the other steps
  recompute only the shallow encoder blocks (down to skip m) and the shallow decoder, reading
  the cached deep feature. The branch numbering of the authors' DDPM and SD code is mapped
  to difflax's in `deepcache_branch_node`.
- The refresh schedule (`deepcache_refresh_steps`): uniform 1:N, a full step every N steps
  (the code's default), or the non-uniform 1:N of Sec. 3.3, full steps denser around a
  chosen step, placed as the code's `sample_from_quad_center` does (`quad_center_steps`).
- `deepcache_plan` builds the plan from a branch and a schedule.
"""
from __future__ import annotations

import numpy as np

from difflax.models.graph import feature_graph
from difflax.samplers.cached import FeaturePlan


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
