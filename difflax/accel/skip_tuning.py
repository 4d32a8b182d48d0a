"""Skip-Tuning: training-free scaling of a UNet's skip connections.

Ma, Xue, Hu, Wang, Liu, Li, Ma, Kawaguchi. "The Surprising Effectiveness of Skip-Tuning in
Diffusion Sampling", ICML 2024 (arXiv:2402.15170).

Sec. 3 (Skip-Tuning): the skip connection from the i-th encoder block is multiplied by
rho_i before the decoder concatenates it, with rho_i interpolated linearly between
rho_top and rho_bottom; the network is not retrained. Sec. 4 searches (rho_top,
rho_bottom) per sampler and NFE by FID; Sec. 5 compares the denoising (score-matching)
loss with and without Skip-Tuning, per noise level, in pixel space and in a feature space.

Conventions in difflax (`difflax.models.skip_connections` lists the skips):
- skip i is the i-th encoder output in encoder order; i = 0 is the first convolution's
  output at full resolution ("top", the outermost skip, concatenated by the decoder's last
  block), i = n - 1 the deepest encoder block ("bottom", concatenated first).
- `linear_skip_scales`: rho_i = rho_top + (rho_bottom - rho_top) * i / (n - 1), linear in
  the skip's index (not in its resolution), so every skip gets its own value.
- the bottleneck (middle blocks -> decoder) path is not a skip and is never scaled: all
  ones reproduces the plain model exactly, and rho < 1 weakens the shortcuts only.

Time-dependent Skip-Tuning (Sec. 5.2): `time_dependent_skip_scales` applies a setting only
for noise levels sigma in a window, at full strength ("constant") or ramped linearly in sigma
across the window ("decreasing": rho falls from 1 at the window's top to the setting at its
bottom, as sampling proceeds; "increasing": the reverse). The window is the paper's; the
linear-in-sigma form of the ramps is difflax's reading of the paper's text (no public code).
The paper tunes rho < 1; larger values are allowed, with a warning.

A `skip_scales` value is an (n,) array (one scalar per skip) or a tuple of n entries, each a
scalar or a (C_i,) per-channel array; a stack of settings (`stack_skip_scales`) has a
leading axis K and is what `get_sweep_fn` vmaps over.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from difflax import schedules as sch
from difflax.models import skip_connections
from difflax.samplers import denoiser_model, get_sample_fn

__all__ = ["linear_skip_scales", "per_resolution_skip_scales", "per_skip_scales",
           "stack_skip_scales", "time_dependent_skip_scales", "get_sweep_fn", "evaluate_settings", "search",
           "denoising_loss_by_sigma"]


# ----------------------------------------------------------------------------
# Schedules of scales (Sec. 3). `config`: the network's UNetConfig or SDUNetConfig, or
# what holds one (a Denoiser, an SDUNet): its feature graph's skips.


def linear_skip_scales(config, rho_top: float, rho_bottom: float) -> jax.Array:
    """(n,) float32: rho_i = rho_top + (rho_bottom - rho_top) i / (n - 1), top (i = 0) first.

    The paper's linear interpolation (Sec. 3), over the skips' indices. The paper's range is
    rho < 1 (weaker shortcuts); values above 1 warn but are allowed.
    """
    if max(rho_top, rho_bottom) > 1:
        warnings.warn(f"rho_top={rho_top}, rho_bottom={rho_bottom}: Skip-Tuning's range is "
                      "rho < 1 (Sec. 4); rho > 1 strengthens the skips", stacklevel=2)
    n = len(skip_connections(config))
    frac = np.arange(n) / max(n - 1, 1)
    return jnp.asarray(rho_top + (rho_bottom - rho_top) * frac, jnp.float32)


def per_resolution_skip_scales(config, values: Mapping[int, float],
                               default: float = 1.0) -> jax.Array:
    """(n,) float32: every skip at resolution r gets `values[r]` (others `default`)."""
    skips = skip_connections(config)
    bad = set(values) - {s.resolution for s in skips}
    if bad:
        raise ValueError(f"no skip connections at resolutions {sorted(bad)}; valid: "
                         f"{sorted({s.resolution for s in skips}, reverse=True)}")
    return jnp.asarray([values.get(s.resolution, default) for s in skips], jnp.float32)


def per_skip_scales(config, values):
    """Arbitrary values, one per skip: a sequence of n entries or a {name: value} dict
    (missing names get 1). Entries are scalars or (C_i,) per-channel arrays.

    Returns an (n,) float32 array if all entries are scalars, else a tuple of n arrays.
    """
    skips = skip_connections(config)
    if isinstance(values, Mapping):
        bad = set(values) - {s.name for s in skips}
        if bad:
            raise ValueError(f"unknown skips {sorted(bad)}; valid: {[s.name for s in skips]}")
        values = [values.get(s.name, 1.0) for s in skips]
    if len(values) != len(skips):
        raise ValueError(f"{len(values)} values for {len(skips)} skip connections")
    values = [jnp.asarray(v, jnp.float32) for v in values]
    for v, s in zip(values, skips):
        if v.ndim > 1 or (v.ndim == 1 and v.shape[0] != s.channels):
            raise ValueError(f"skip {s.name} has {s.channels} channels; "
                             f"got a value of shape {v.shape}")
    if all(v.ndim == 0 for v in values):
        return jnp.stack(values)
    return tuple(values)


def stack_skip_scales(settings: Sequence) -> object:
    """Stacks K settings of the same structure along a new leading axis (for `vmap`)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *settings)


TIME_PROFILES = ("constant", "decreasing", "increasing")


def time_dependent_skip_scales(skip_scales, sigma, *, window=(0.0, math.inf),
                               profile: str = "constant"):
    """The skip scales a model call at noise level `sigma` (a scalar) uses (Sec. 5.2).

    With strength w(sigma), every scale rho becomes w rho + (1 - w) (w = 1 gives the setting
    exactly, w = 0 all ones). Outside window = (lo, hi), lo <= sigma <= hi, w = 0. Inside:
    "constant" w = 1; "decreasing" w = (hi - sigma) / (hi - lo), so rho decreases from 1 to the
    setting as sampling goes from hi down to lo; "increasing" w = (sigma - lo) / (hi - lo).
    The ramps need a finite window. Works under `jit`; `sigma` may be traced.
    """
    if profile not in TIME_PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid choices: {TIME_PROFILES}")
    lo, hi = window
    if not lo < hi or (profile != "constant" and not math.isfinite(hi)):
        raise ValueError(f"window must be (lo, hi) with lo < hi (finite for {profile!r}), "
                         f"got {window}")
    sigma = jnp.asarray(sigma, jnp.float32)
    inside = (sigma >= lo) & (sigma <= hi)
    if profile == "constant":
        w = jnp.float32(1.0)
    else:
        w = (hi - sigma if profile == "decreasing" else sigma - lo) / (hi - lo)
    w = jnp.where(inside, w, 0.0)
    return jax.tree.map(lambda s: w * s + (1 - w), skip_scales)


# ----------------------------------------------------------------------------
# Sweeps and search (Sec. 4).

def get_sweep_fn(denoiser, *, sampler: str, steps: int, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, window=None, profile: str = "constant", **options):
    """Returns (sweep, nfe): sampling under K skip settings in one compiled call.

    `sweep(variables, skip_scales, key, labels)` with skip_scales stacked (K, ...) and
    labels (B,) int (ignored by an unconditional model) returns (K, B, R, R, C) images in
    [-1, 1]; every setting starts from the same noise (drawn from `key`), so settings
    differ only by their scales. It is `jax.vmap` over the skip scales of the
    `difflax.samplers.get_sample_fn` sampler. The denoiser D(x; sigma) is an x0-prediction
    on the EDM schedule (time = sigma); `options` go to the sampler (e.g. order=3 for
    "deis_tab"). With `window` (and `profile`) each model call uses
    `time_dependent_skip_scales` at its sigma (Sec. 5.2); the samplers give one time to the
    whole batch.
    """
    net = denoiser.net
    at_t = None if window is None else (lambda scales, t: time_dependent_skip_scales(
        scales, jnp.ravel(t)[0], window=window, profile=profile))
    run, nfe = get_sample_fn(denoiser_model(denoiser, time_skip_scales=at_t),
                             schedule=sch.edm(sigma_min, sigma_max), sampler=sampler,
                             steps=steps, prediction="x0", clip=True, **options)
    settings = jax.vmap(run, in_axes=(None, None, None, 0))

    @jax.jit
    def sweep(variables, skip_scales, key, labels):
        shape = (labels.shape[0], net.img_resolution, net.img_resolution, net.in_channels)
        return settings(variables["params"], jax.random.normal(key, shape), labels, skip_scales)

    return sweep, nfe


def evaluate_settings(sweep, variables, skip_scales, *, metric, key, num_samples: int,
                      batch_size: int, num_classes: int = 10,
                      classify_fn: Callable | None = None, **store) -> list[dict]:
    """Frechet distance (and class accuracy) of each of the K stacked settings.

    `metric` is a `difflax.metrics.FrechetMetric` (e.g. `digits_frechet_metric`); batch i
    uses key fold_in(key, i) and labels drawn uniformly from `num_classes`, the same for all
    settings (`difflax.metrics.evaluate_samples` with `settings=K`). Returns K dicts
    {metric.name: float, "class_accuracy": float (if classify_fn)}. `store` / `store_tag`
    keep the drawn batches for a resumable run (`evaluate_samples`).
    """
    from difflax.metrics import evaluate_samples  # the metrics package is heavy: import on use

    def sample_fn(kb, n):
        labels = jax.random.randint(jax.random.fold_in(kb, 1), (n,), 0, num_classes)
        return sweep(variables, skip_scales, kb, labels), labels

    rows = evaluate_samples(sample_fn, key=key, num_samples=num_samples, batch_size=batch_size,
                            frechet_metrics=[metric], classify_fn=classify_fn, progress=False,
                            frechet_method="eigh",
                            settings=jax.tree.leaves(skip_scales)[0].shape[0], **store)
    return [{k: v for k, v in row.items() if k != "num_samples"} for row in rows]


def search(sweep, variables, settings: Mapping[object, object], *, metric, key,
           num_samples: int, batch_size: int, num_classes: int = 10,
           classify_fn: Callable | None = None, **store):
    """Picks the setting with the lowest `metric` for the sampler and NFE of `sweep`.

    `settings` maps a label (e.g. (rho_top, rho_bottom)) to a skip_scales value; all of them
    are evaluated in one vmapped call per batch (Sec. 4's grid search over rho).
    Returns (best_label, table) with table a list of {"setting": label, metric: ...}.
    `store` / `store_tag`: as `evaluate_settings`.
    """
    labels = list(settings)
    rows = evaluate_settings(sweep, variables, stack_skip_scales([settings[s] for s in labels]),
                             metric=metric, key=key, num_samples=num_samples,
                             batch_size=batch_size, num_classes=num_classes,
                             classify_fn=classify_fn, **store)
    table = [{"setting": s, **r} for s, r in zip(labels, rows)]
    best = min(table, key=lambda r: r[metric.name])["setting"]
    return best, table


# ----------------------------------------------------------------------------
# The loss analysis (Sec. 5).

def _loss_by_sigma(denoiser, feature_fn, variables, images, labels, sigmas, skip_scales, key):
    noise = jax.random.normal(key, images.shape, images.dtype)
    target = None if feature_fn is None else feature_fn(images)

    def at(sigma):
        d = denoiser.apply(variables, images + sigma * noise, sigma, labels,
                           skip_scales=skip_scales)
        pixel = jnp.mean((d - images) ** 2)
        if feature_fn is None:
            return pixel, jnp.float32(jnp.nan)
        return pixel, jnp.mean((feature_fn(d) - target) ** 2)

    return jax.lax.map(at, sigmas)


_loss_jit = jax.jit(_loss_by_sigma, static_argnums=(0, 1))


def denoising_loss_by_sigma(denoiser, variables, images, labels, sigmas, *, skip_scales=None,
                            feature_fn=None, key) -> dict[str, np.ndarray]:
    """Denoising (score-matching) loss per noise level, in pixel and feature space (Sec. 5).

        pixel(sigma)   = mean ||D(x + sigma n; sigma) - x||^2          over pixels and images
        feature(sigma) = mean ||f(D(x + sigma n; sigma)) - f(x)||^2    over features and images

    images (N, R, R, C) clean data in [-1, 1], labels (N,) int or None, sigmas (S,); the same
    noise n ~ N(0, I) (from `key`) serves every sigma and every skip setting, so settings
    are compared on identical inputs. Unweighted (the EDM weight lambda(sigma) is constant per
    sigma). `feature_fn`: images (N, ...) -> features (N, F), e.g. the digits classifier's
    `lambda x: digits_features(params, x)`; pass the same function object across calls to
    reuse the compiled analysis. Returns {"sigma", "pixel", "feature"} (S,) arrays
    (feature is NaN without `feature_fn`). `skip_scales=None` means all ones.
    """
    if skip_scales is None:
        skip_scales = jnp.ones(len(skip_connections(denoiser.net)), jnp.float32)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    pixel, feature = _loss_jit(denoiser, feature_fn, variables, jnp.asarray(images, jnp.float32),
                               labels, sigmas, skip_scales, key)
    return {"sigma": np.asarray(sigmas), "pixel": np.asarray(pixel), "feature": np.asarray(feature)}
