"""Config files at the edge: load `path.py[:variant]`, apply `--config.a.b=v`, build typed objects.

A config file defines `get_config(variant: str = "") -> ml_collections.ConfigDict` with the
sections of `configs/default.py`. Nothing past this module sees a ConfigDict: the model
becomes a `Denoiser` (frozen `UNetConfig` inside), training a `TrainConfig`.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys

import ml_collections

from difflax import data
from difflax.models import Denoiser, UNetConfig
from difflax.training import TrainConfig


def load_config(spec: str, overrides: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """`spec` is "path/to/config.py" or "path/to/config.py:variant"; overrides "a.b=value"."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path!r}; the shipped ones are configs/*.py "
                                "(digits_edm.py, cifar10_ddpmpp.py, imagenet64_adm.py)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    sys.path.insert(0, root)  # so that `from configs import default` resolves
    try:
        name = os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config(variant)
    finally:
        sys.path.remove(root)
    for item in overrides:
        apply_override(config, item)
    return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Sets "a.b=value", parsing value as the existing field's type. Unknown keys are errors."""
    key, sep, text = item.partition("=")
    if not sep:
        raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.steps=10)")
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if part not in keys:
            where = ".".join(parts[:i]) or "the config"
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint}; valid keys in {where}: "
                             f"{', '.join(sorted(keys))}")
        if i < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    node[leaf] = _parse_like(node[leaf], text, key)


def _parse_like(current, text: str, key: str):
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"config key {key!r} takes true or false, not {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"config key {key!r} takes a {type(current).__name__}, not {text!r}") from None
    if isinstance(current, (tuple, list)):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if current is not None and not isinstance(value, type(current)):
        raise ValueError(f"config key {key!r} takes a {type(current).__name__}, not {text!r}")
    return value


def dataset_spec(config) -> data.DatasetSpec:
    """The dataset's example shape and class count, checked to be images a UNet takes."""
    d = config.data
    spec = data.dataset_spec(d.name, resolution=d.resolution or None)
    if len(spec.shape) != 3:
        raise ValueError(f"dataset {d.name!r} holds vectors of shape {spec.shape}, not images; "
                         "the UNet configs train on digits or tfds:<image dataset>")
    return spec


def denoiser_from_config(config) -> Denoiser:
    """The Denoiser (UNet + preconditioning) a config describes, sized to its dataset."""
    m = dict(config.model)
    spec = dataset_spec(config)
    h, w, c = spec.shape
    if h != w:
        raise ValueError(f"images of {h}x{w} are not square; the UNet takes R x R images")
    precond = {k: m.pop(k) for k in ("precond", "sigma_data")}
    conditional = m.pop("conditional")
    net = UNetConfig(img_resolution=h, in_channels=c, out_channels=c,
                     label_dim=spec.num_classes if conditional else 0, **m)
    return Denoiser(net=net, **precond)


def train_config(config) -> TrainConfig:
    t = dict(config.train)
    t["grad_clip"] = t["grad_clip"] or None
    return TrainConfig(**t)
