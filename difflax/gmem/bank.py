"""GMem's explicit memory bank: L2-normalised snippets of an encoder over the training set,
its compression, sampling and interpolation.

Tang et al. 2024, "Generative Modeling with Explicit Memory" (GMem, code LINs-lab/GMem
`datasets/construct_memory_bank.py`, `utils/svd_utils.py`), Sec. 3: every training image x_i
is encoded once, f_i = E(x_i) / ||E(x_i)||, and the generator is conditioned on f_i in place
of its class label; new images are drawn by picking snippets from the bank (or encoding new
images, or interpolating snippets, Sec. 4) and running the sampler.

A `MemoryBank` is a pytree: `entries` (N, R) are the snippets themselves (R = D) or, for a
low-rank bank, their coefficients in an orthonormal `basis` (R, D) around the snippets'
`mean` (D,) (GMem's SVD compression, `utils/svd_utils.py` `DMDMemoryBank`: centred, then
truncated); `frequencies` (N,) count the training images behind each entry (1 each before
k-means compression; k-means compression is difflax's addition, GMem's code has full and SVD
banks only); `assignment` (M,) maps training image i to its entry, so training looks
up f_i = bank.lookup(assignment[i]). Any encoder works: pass `encoder_fn(images) -> (B, D)`
(e.g. DINOv2 class tokens computed elsewhere); for the digits, `digits_snippet_encoder`.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from difflax.mesh import batch_sharded, replicated

SAMPLING = ("uniform", "frequency")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of x (..., D) scaled to unit L2 norm (zero rows stay zero)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@flax.struct.dataclass
class MemoryBank:
    """entries (N, R), frequencies (N,) float32, assignment (M,) int32, basis (R, D) and
    mean (D,) or None."""

    entries: jax.Array
    frequencies: jax.Array
    assignment: jax.Array
    basis: jax.Array | None = None
    mean: jax.Array | None = None

    @property
    def size(self) -> int:
        return self.entries.shape[0]

    @property
    def dim(self) -> int:
        return (self.entries if self.basis is None else self.basis).shape[-1]

    def lookup(self, idx) -> jax.Array:
        """Snippets (..., D) of the entries `idx` (...): the unit snippets, or for a low-rank
        bank their reconstruction e @ basis + mean, not re-normalised (GMem's `get`)."""
        e = self.entries[idx]
        return l2_normalize(e) if self.basis is None else e @ self.basis + self.mean

    def snippets_of(self, image_idx) -> jax.Array:
        """Snippets (..., D) of training images `image_idx` (...) (via `assignment`)."""
        return self.lookup(self.assignment[image_idx])


def build_memory_bank(encoder_fn: Callable[[jax.Array], jax.Array], images, *,
                      batch_size: int = 256) -> MemoryBank:
    """Encodes every training image once, in batches: one entry per image.

    images: an array (M, ...) (split into batches of `batch_size`) or an iterable of
    batches; encoder_fn(batch (B, ...)) -> (B, D) features, normalised here.
    """
    batches: Iterable = (images[i:i + batch_size] for i in range(0, len(images), batch_size)) \
        if hasattr(images, "shape") else images
    feats = [np.asarray(l2_normalize(jnp.asarray(encoder_fn(b), jnp.float32))) for b in batches]
    if not feats:
        raise ValueError("build_memory_bank got no images")
    entries = np.concatenate(feats)
    m = len(entries)
    return MemoryBank(entries=jnp.asarray(entries), frequencies=jnp.ones((m,), jnp.float32),
                      assignment=jnp.arange(m, dtype=jnp.int32))


def save_memory_bank(path: str | os.PathLike, bank: MemoryBank) -> None:
    """Writes the bank to an .npz (entries, frequencies, assignment, optional basis, mean)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {k: np.asarray(v) for k, v in (("entries", bank.entries),
                                            ("frequencies", bank.frequencies),
                                            ("assignment", bank.assignment),
                                            ("basis", bank.basis), ("mean", bank.mean))
              if v is not None}
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_memory_bank(path: str | os.PathLike) -> MemoryBank:
    """Reads a bank written by `save_memory_bank`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no memory bank at {path}: build one with build_memory_bank "
                                "and save_memory_bank first")
    with np.load(path) as f:
        return MemoryBank(entries=jnp.asarray(f["entries"]),
                          frequencies=jnp.asarray(f["frequencies"]),
                          assignment=jnp.asarray(f["assignment"]),
                          basis=jnp.asarray(f["basis"]) if "basis" in f.files else None,
                          mean=jnp.asarray(f["mean"]) if "mean" in f.files else None)


# ----------------------------------------------------------------------------
# Compression (GMem Sec. 3): k-means with frequencies, or a low-rank SVD basis.


def kmeans_compress(bank: MemoryBank, num_entries: int, *, key: jax.Array,
                    iters: int = 25) -> MemoryBank:
    """Spherical k-means of the snippets into `num_entries` unit centroids.

    Each centroid's frequency is the total frequency of the snippets assigned to it (cosine
    similarity), and every training image is re-pointed to its snippet's centroid. Starts
    from `num_entries` distinct snippets drawn with `key`; an empty cluster keeps its
    centroid. One jitted `lax.fori_loop`.
    """
    x = bank.lookup(jnp.arange(bank.size))
    if not 0 < num_entries <= bank.size:
        raise ValueError(f"num_entries must be in [1, {bank.size}], got {num_entries}")
    w = bank.frequencies

    @jax.jit
    def run(x, w, key):
        init = x[jax.random.choice(key, x.shape[0], (num_entries,), replace=False)]

        def step(_, c):
            assign = jnp.argmax(x @ c.T, axis=-1)
            sums = jax.ops.segment_sum(w[:, None] * x, assign, num_entries)
            counts = jax.ops.segment_sum(w, assign, num_entries)
            return jnp.where(counts[:, None] > 0, l2_normalize(sums), c)

        c = jax.lax.fori_loop(0, iters, step, init)
        assign = jnp.argmax(x @ c.T, axis=-1)
        return c, jax.ops.segment_sum(w, assign, num_entries), assign.astype(jnp.int32)

    centroids, freqs, assign = run(x, w, key)
    return MemoryBank(entries=centroids, frequencies=freqs, assignment=assign[bank.assignment])


def svd_compress(bank: MemoryBank, rank: int) -> MemoryBank:
    """GMem's SVD compression (`utils/svd_utils.py` `DMDMemoryBank`): the snippets minus their
    mean m, x - m = U S V^T, truncated to `rank`; entries become the coefficients (N, rank) of
    x - m in the orthonormal basis V_rank^T (rank, D), and `lookup` gives e V^T + m, GMem's
    C M^T + mean (its C = U sqrt(S), M = V sqrt(S) split the same product). Storage drops from
    N D to (N + D) rank + D numbers."""
    x = bank.lookup(jnp.arange(bank.size))
    if not 0 < rank <= min(x.shape):
        raise ValueError(f"rank must be in [1, {min(x.shape)}], got {rank}")
    mean = jnp.mean(x, axis=0)
    _, _, vt = jnp.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:rank]
    return MemoryBank(entries=(x - mean) @ basis.T, frequencies=bank.frequencies,
                      assignment=bank.assignment, basis=basis, mean=mean)


def shard_memory_bank(bank: MemoryBank, mesh) -> MemoryBank:
    """Splits the entries over the mesh's "data" axis (rows padded to a multiple of the
    device count with zero-frequency entries that sampling never picks)."""
    pad = -bank.size % mesh.size
    entries = jnp.pad(bank.entries, ((0, pad), (0, 0)))
    freqs = jnp.pad(bank.frequencies, (0, pad))
    rows, repl = batch_sharded(mesh), replicated(mesh)
    return MemoryBank(entries=jax.device_put(entries, rows), frequencies=jax.device_put(freqs, rows),
                      assignment=jax.device_put(bank.assignment, repl),
                      basis=None if bank.basis is None else jax.device_put(bank.basis, repl),
                      mean=None if bank.mean is None else jax.device_put(bank.mean, repl))


# ----------------------------------------------------------------------------
# Sampling snippets (GMem Sec. 4): from the bank, and between two snippets.


def sample_entries(bank: MemoryBank, key: jax.Array, num: int, *, by: str = "uniform") -> jax.Array:
    """(num,) entry indices drawn with replacement, uniformly over the (non-padding) entries
    or in proportion to their frequencies."""
    if by not in SAMPLING:
        raise ValueError(f"unknown sampling {by!r}; valid choices: {', '.join(SAMPLING)}")
    p = bank.frequencies if by == "frequency" else (bank.frequencies > 0).astype(jnp.float32)
    return jax.random.choice(key, bank.size, (num,), p=p / p.sum())


def sample_snippets(bank: MemoryBank, key: jax.Array, num: int, *, by: str = "uniform") -> jax.Array:
    """(num, D) unit snippets drawn from the bank (`sample_entries`)."""
    return bank.lookup(sample_entries(bank, key, num, by=by))


def lerp(a: jax.Array, b: jax.Array, w) -> jax.Array:
    """Linear interpolation (1 - w) a + w b of snippets (..., D), re-normalised to the sphere.

    w: scalar or (K,) weights; a (K,) w gives (K, ..., D)."""
    w = jnp.asarray(w, jnp.float32).reshape(jnp.shape(w) + (1,) * jnp.ndim(a))
    return l2_normalize((1 - w) * a + w * b)


def slerp(a: jax.Array, b: jax.Array, w) -> jax.Array:
    """Spherical interpolation of unit snippets (..., D) along the great circle (Shoemake
    1985): sin((1-w) theta) / sin(theta) a + sin(w theta) / sin(theta) b, cos theta = a.b;
    falls back to `lerp` for (anti)parallel a, b. w as in `lerp`."""
    a, b = l2_normalize(a), l2_normalize(b)
    straight = lerp(a, b, w)
    w = jnp.asarray(w, jnp.float32).reshape(jnp.shape(w) + (1,) * jnp.ndim(a))
    theta = jnp.arccos(jnp.clip(jnp.sum(a * b, -1, keepdims=True), -1.0, 1.0))
    sin = jnp.sin(theta)
    safe = jnp.where(sin > 1e-6, sin, 1.0)
    out = (jnp.sin((1 - w) * theta) * a + jnp.sin(w * theta) * b) / safe
    return jnp.where(sin > 1e-6, out, straight)


INTERPOLATIONS = ("linear", "spherical", "concat", "mask")


def interpolate_snippets(a: jax.Array, b: jax.Array, w, *, method: str = "spherical",
                         key: jax.Array | None = None) -> jax.Array:
    """GMem's snippet interpolations (`utils/pipeline.py` `InterpolationPipeline`), each result
    re-normalised to the sphere as there. a, b (D,) or (N, D); w as in `lerp`.

    "linear" `lerp`; "spherical" `slerp` (GMem's default in `interpolate_generation`);
    "concat": the first D // 2 features of a and the rest of b (w unused; its pipeline's
    default); "mask": each feature from a or b with probability 1/2, drawn from `key` (w
    unused). GMem splits and masks along the first axis of the tensors it gets, single (D,)
    snippets in its pipeline; here always along the feature axis.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {method!r}; valid choices: {INTERPOLATIONS}")
    if method == "linear":
        return lerp(a, b, w)
    if method == "spherical":
        return slerp(a, b, w)
    if method == "concat":
        half = a.shape[-1] // 2
        return l2_normalize(jnp.concatenate([a[..., :half], b[..., half:]], axis=-1))
    if key is None:
        raise ValueError("the 'mask' interpolation needs key=")
    return l2_normalize(jnp.where(jax.random.bernoulli(key, 0.5, a.shape), a, b))


# ----------------------------------------------------------------------------
# A snippet encoder for the embedded digits.


def digits_snippet_encoder(*, seed: int = 1, steps: int = 2000):
    """encoder_fn(images (B, R, R, 1) in [-1, 1]) -> (B, 64) for the digits: the penultimate
    features of `difflax.metrics`' digits classifier, trained offline in seconds with its
    own `seed`. The default seed 1 differs from the cached seed-0 network behind `fd_digits`,
    so the memory is not the evaluation's own feature space (same architecture and data)."""
    from difflax.metrics.digits_features import digits_features, train_digits_classifier

    params = train_digits_classifier(seed=seed, steps=steps).params
    return lambda images: digits_features(params, images)
