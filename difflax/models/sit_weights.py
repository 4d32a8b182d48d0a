"""willisma/SiT's PyTorch weights as Flax variables of `difflax.models.sit.SiT`.

Parameter names follow the PyTorch module names (`blocks_0/attn/qkv` here is
`blocks.0.attn.qkv` there): `convert_sit_state_dict` maps a state dict by name, `load_sit`
reads a local checkpoint.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import traverse_util

from difflax.models.convert import fitted_variables
from difflax.models.sit import SiT, SiTConfig, init_sit, sit_config

_SIT_FIELDS = tuple(f.name for f in dataclasses.fields(SiTConfig))


def _sit_flax_path(name: str, ndim: int) -> tuple[str, ...]:
    """`blocks.0.attn.qkv.weight` -> (blocks_0, attn, qkv, kernel); numbered parts join."""
    parts = []
    for part in name.split("."):
        if part.isdigit():
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    if parts[0] in ("x_embedder", "t_embedder"):
        parts = [f"{parts[0]}_{parts[1]}", *parts[2:]]
    if parts[-2:] == ["embedding_table", "weight"]:
        return tuple(parts[:-2] + ["embedding"])
    if parts[-1] == "weight" and ndim in (2, 4):
        parts[-1] = "kernel"
    return tuple(parts)


def convert_sit_state_dict(state_dict, config: SiTConfig) -> dict:
    """willisma/SiT state dict (PyTorch names and layouts) -> `{"params": ...}` of SiT(config).

    Linear weights (out, in) -> (in, out), the patch convolution OIHW -> HWIO, the label
    table stays (rows, D). Missing, unexpected or mis-shaped entries raise one error
    naming them (and the fields of SiTConfig to check).
    """
    flat = {}
    for name, value in state_dict.items():
        value = np.asarray(value, np.float32)
        path = _sit_flax_path(name, value.ndim)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2 and path[-1] == "kernel":
            value = value.T
        flat[path] = value
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(
        jax.eval_shape(lambda: init_sit(config, jax.random.key(0)))["params"]).items()}
    return fitted_variables(flat, expected, "this SiT (check " + ", ".join(_SIT_FIELDS[:10]) + ")")


def load_sit(path: str | os.PathLike, config: SiTConfig | str | None = None, **fields):
    """Loads willisma/SiT weights from a local file: returns `(SiT module, variables)`.

    path: a state dict `.pt` / `.pth` (e.g. SiT's released `SiT-XL-2-256x256.pt`; a
    training checkpoint's "ema" entry is used) or `.npz` (keys `param/<name>`, optional
    `config_json` with SiT's constructor arguments). config: a SiTConfig, a preset name
    ("SiT-XL/2"), or None for the npz's `config_json`; `fields` override it
    (e.g. input_size=32, num_classes=1000).
    """
    import json

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no SiT weights at {path}: pass the path of a willisma/SiT "
                                "checkpoint (.pt) or state dict (.npz) on this machine")
    stored = {}
    if path.endswith(".npz"):
        with np.load(path) as f:
            state_dict = {k.removeprefix("param/"): f[k] for k in f.files if k.startswith("param/")}
            if "config_json" in f.files:
                stored = json.loads(str(f["config_json"]))
    elif path.endswith((".pt", ".pth")):
        import torch  # optional dependency of this loader only

        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises pickle, zip or runtime errors by format
            raise ValueError(f"{path} is not a PyTorch state dict that torch.load reads "
                             f"with weights_only=True ({type(error).__name__})") from error
        state_dict = state_dict.get("ema", state_dict) if isinstance(state_dict, dict) else None
        if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise ValueError(f"{path} holds no SiT state dict (name -> tensor, or a training "
                             "checkpoint with an 'ema' one)")
        state_dict = {k: v.numpy() for k, v in state_dict.items()}
    else:
        raise ValueError(f"unknown weights format {path!r}; valid: .pt, .pth, .npz")
    if isinstance(config, str):
        config = sit_config(config, **fields)
    elif config is None:
        unknown = sorted(set(stored) - set(_SIT_FIELDS))
        if unknown:
            raise ValueError(f"unknown SiT argument(s) {unknown}; valid: {list(_SIT_FIELDS)}")
        config = SiTConfig(**{**stored, **fields})
    elif fields:
        config = dataclasses.replace(config, **fields)
    return SiT(config), convert_sit_state_dict(state_dict, config)
