"""Shipped models: a run's EMA weights exported once, loaded with one call.

A testbed is a folder with the run's resolved ``config.json`` and its EMA parameters in
``ema_params.safetensors`` (flat names ``"net/enc/.../kernel"``, float32), small enough to
ship inside the package (``difflax/testbed_weights/<name>/``). ``README.md`` beside them gives the
command that made them.

    difflax export --workdir runs/mnist --out difflax/testbed_weights/mnist_edm
    config, denoiser, params = load_testbed("mnist_edm")      # or a folder path
    denoiser.apply({"params": params}, x, sigma, labels)
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from difflax import configs
from difflax.training import get_init_params_fn

__all__ = ["SHIPPED", "denoising_error", "export_params", "load_testbed", "testbed_dir"]

SHIPPED = os.path.join(os.path.dirname(__file__), "testbed_weights")
WEIGHTS = "ema_params.safetensors"


def testbed_dir(name_or_path: str) -> str:
    """The folder of a shipped testbed (``os.listdir(SHIPPED)``) or an exported one."""
    if os.path.isdir(name_or_path):
        return name_or_path
    shipped = os.path.join(SHIPPED, name_or_path)
    if os.path.isdir(shipped):
        return shipped
    names = sorted(os.listdir(SHIPPED)) if os.path.isdir(SHIPPED) else []
    raise FileNotFoundError(f"no testbed {name_or_path!r}: neither a folder nor a shipped name; "
                            f"shipped: {names}")


def export_params(config: ml_collections.ConfigDict, params, out_dir: str) -> None:
    """Writes ``config.json`` and ``ema_params.safetensors`` (float32) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    save_file({k: np.asarray(v, np.float32) for k, v in flat.items()},
              os.path.join(out_dir, WEIGHTS))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))


def load_testbed(name_or_path: str):
    """(config, denoiser, params) of a shipped testbed or an exported folder.

    The parameters are checked against the config's model: a missing, extra or misshapen
    array is an error naming it."""
    folder = testbed_dir(name_or_path)
    with open(os.path.join(folder, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    denoiser = configs.denoiser_from_config(config)
    expected = traverse_util.flatten_dict(
        jax.eval_shape(get_init_params_fn(denoiser, jax.random.key(0))), sep="/")
    flat = load_file(os.path.join(folder, WEIGHTS))
    problems = sorted(set(expected) ^ set(flat)) or [
        f"{k}: {flat[k].shape} != {v.shape}" for k, v in expected.items()
        if flat[k].shape != v.shape]
    if problems:
        raise ValueError(f"{folder} does not hold the parameters of its config's model: "
                         f"{problems[:3]}")
    return config, denoiser, traverse_util.unflatten_dict(flat, sep="/")


# one compilation per (denoiser, shapes), shared by every call
_apply = jax.jit(lambda denoiser, params, x, sigma, labels: denoiser.apply(
    {"params": params}, x, sigma, labels), static_argnums=0)


def denoising_error(denoiser, params, images, labels, sigmas, seed: int = 0) -> np.ndarray:
    """Mean squared error of D(x + sigma n; sigma, label) against x, per sigma (one noise draw
    n per image, the same at every sigma): a trained model's is far below the noisy input's
    sigma^2. images (N, R, R, C) in [-1, 1], labels (N,), sigmas (S,) -> (S,)."""
    n, sigmas = len(images), np.asarray(sigmas, np.float32)
    noise = np.random.default_rng(seed).normal(size=images.shape).astype(np.float32)
    sigma = np.repeat(sigmas, n)
    x = np.concatenate([images] * len(sigmas))
    noisy = x + sigma[:, None, None, None] * np.concatenate([noise] * len(sigmas))
    out = np.asarray(_apply(denoiser, params, noisy, sigma,
                            np.concatenate([labels] * len(sigmas))))
    return np.mean((out - x) ** 2, axis=(1, 2, 3)).reshape(len(sigmas), n).mean(1)
