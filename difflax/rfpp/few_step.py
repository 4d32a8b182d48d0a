"""rfpp's few-step sampling: its schedule and time grids, and straightness.

- `rf_schedule()`: the rectified-flow schedule x_t = (1 - t) x + t z on [0, 1 - 1e-5]: rfpp
  starts sampling at t = 1 - 1e-5, where x_t = t z and the EDM re-expression of the velocity
  (`velocity_from_denoiser`) sees sigma = t / (1 - t) = 1e5.
- `rf_grid(steps)`: rfpp's uniform grid from 1 - 1e-5 down to 0; `rf_grid(t_steps=...)`
  rfpp's custom grid (`generate.py --t_steps 1,0.75,0.5,0.25`). Samplers on them: `rf_euler`,
  `rf_heun` and rfpp's re-noising `rf_renoise` (`difflax.samplers.flow`), by name through
  `difflax.samplers.get_sample_fn` (`difflax.rfpp.get_rectified_flow_sample_fn`).
- `straightness` (Liu et al. 2023, Def. 2.4; rfpp `utils.straightness`): along the Euler
  trajectory of the flow on a grid, S = sum_i dt_i ||v_i - (x_T - x_0) / T||^2 / T per example
  (mean over elements), v_i = (x_i - x_{i+1}) / dt_i; 0 for a straight flow.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from difflax import schedules
from difflax.samplers.flow import euler_trajectory

T_MAX = 1.0 - 1e-5


def rf_schedule(t_max: float = T_MAX) -> schedules.RectifiedFlow:
    """The rectified-flow schedule on [0, t_max] (noise at t = 1)."""
    return schedules.rectified_flow(t_min=0.0, t_max=t_max)


def rf_grid(steps: int | None = None, t_max: float = T_MAX, *, t_steps=None) -> np.ndarray:
    """rfpp's grid, float64: `steps` uniform intervals from t_max down to 0 (steps + 1,), or
    its custom `t_steps` (decreasing times in (0, 1], the first replaced by t_max, then 0
    appended, as rfpp's `--t_steps`): (len(t_steps) + 1,)."""
    if (steps is None) == (t_steps is None):
        raise ValueError("pass steps= or t_steps=, not both")
    if steps is not None:
        return schedules.time_grid(rf_schedule(t_max), steps, "uniform")
    t = np.asarray(t_steps, np.float64)
    if t.ndim != 1 or len(t) < 1 or np.any(t <= 0) or np.any(t > 1) or np.any(np.diff(t) >= 0):
        raise ValueError(f"t_steps must be decreasing times in (0, 1], got {t_steps}")
    return np.concatenate([[t_max], t[1:], [0.0]])


def straightness(model_fn, noise, *, schedule, grid, prediction="velocity") -> jax.Array:
    """Straightness of the flow along its Euler trajectory on `grid`, per example: (B,).

    model_fn(x (B, ...), t (B,)) -> prediction of kind `prediction`; noise (B, ...).
    """
    traj = euler_trajectory(model_fn, noise, schedule=schedule, grid=grid, prediction=prediction)
    dt = jnp.asarray(-np.diff(np.asarray(grid, np.float64)), traj.dtype)  # (N,) > 0
    total = jnp.sum(dt)
    shape = (-1,) + (1,) * (traj.ndim - 1)
    v = (traj[:-1] - traj[1:]) / dt.reshape(shape)
    base = (traj[0] - traj[-1]) / total
    sq = jnp.mean(((v - base) ** 2).reshape(v.shape[0], v.shape[1], -1), axis=-1)  # (N, B)
    return jnp.sum(dt[:, None] * sq, axis=0) / total
