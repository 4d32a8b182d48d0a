"""The one linear exponential multistep solver behind DDIM, DEIS tAB / rhoAB / log-rho,
iPNDM and DPM-Solver(++) multistep: they differ only in their coefficient tables."""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from difflax.samplers.term import AbstractGridSolver


def check_order(name: str, order, valid, n_steps: int) -> None:
    """A one-line error naming the valid orders, or the steps a multistep `order` needs."""
    if order not in valid:
        raise ValueError(f"{name}: order must be one of {tuple(valid)}, got {order!r}")
    if order > max(n_steps - 1, 0) and order > min(valid):
        raise ValueError(f"{name}: order {order} needs at least {order + 1} steps, the grid has "
                         f"{n_steps}; use order <= {max(n_steps - 1, min(valid))}")


def multistep_solver(times, a, b, form: str) -> "ExponentialMultistep":
    """An `ExponentialMultistep` from host tables: times (N+1,), a (N,), b (N, Q+1)."""
    return ExponentialMultistep(times=jnp.asarray(times), a=jnp.asarray(a), b=jnp.asarray(b),
                                form=form)


class ExponentialMultistep(AbstractGridSolver):
    """x_{i+1} = A_i x_i + sum_j B_ij p_{i-j} with p the model's `form` ("eps" or "x0").

    times (N+1,), a (N,), b (N, Q+1): tables from `difflax.samplers.coefficients`; the last Q
    outputs are kept in the solver state (zeros, with zero weights, during warm start).
    """

    times: jax.Array
    a: jax.Array
    b: jax.Array
    form: str = eqx.field(static=True)

    calls_per_step = 1

    def first_point(self, i, x):
        return self.times[i], x

    def _init_state(self, y0):
        return jnp.zeros((self.b.shape[1] - 1,) + y0.shape, y0.dtype)

    def _step(self, term, i, x, history):
        p = term.predict(self.times[i], x, self.form)
        ps = jnp.concatenate([p[None], history])
        x1 = self.a[i] * x + jnp.tensordot(self.b[i], ps, axes=1)
        return x1.astype(x.dtype), ps[:-1]
