"""Weights from NVlabs/edm: state_dicts (.pt/.pth/.npz) and training snapshots (.pkl).

A snapshot (`network-snapshot-*.pkl`) pickles EDM's modules together with their source
code (`torch_utils.persistence`); unpickling it normally executes that code. Here a
restricted unpickler rebuilds only tensors and plain containers, turns every persistent
object into a dict of its recorded state, and refuses any other global. So a snapshot
loads without EDM's code installed and without running anything it carries. Torch is
needed for .pt/.pth/.pkl files (for the tensors' storage format), not for .npz.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from difflax.models.precond import Denoiser
from difflax.models.unet import UNetConfig

PRECOND_CLASSES = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
_UNET_FIELDS = {f for f in UNetConfig.__dataclass_fields__}


def config_from_edm(**arch) -> tuple[UNetConfig, dict]:
    """Splits EDMPrecond's constructor arguments into a UNetConfig and Denoiser fields.

    `img_channels` sets both in_channels and out_channels, as EDMPrecond does. Unknown
    names are an error listing the accepted ones.
    """
    arch = dict(arch)
    precond = {k: arch.pop(k) for k in ("sigma_data", "beta_d", "beta_min", "M") if k in arch}
    for k in ("use_fp16", "sigma_min", "sigma_max", "epsilon_t", "class_name"):
        arch.pop(k, None)
    if "img_channels" in arch:
        arch["in_channels"] = arch["out_channels"] = arch.pop("img_channels")
    unknown = sorted(set(arch) - _UNET_FIELDS)
    if unknown:
        raise ValueError(f"unknown EDM architecture argument(s) {unknown}; valid: "
                         f"{sorted(_UNET_FIELDS | {'img_channels', 'sigma_data', 'beta_d', 'beta_min', 'M'})}")
    return UNetConfig(**arch), precond


def convert_state_dict(state_dict: Mapping[str, Any], denoiser: Denoiser) -> dict:
    """EDM state_dict (names `model.enc.16x16_conv.weight`, PyTorch layouts) -> Flax variables.

    Conv weights go OIHW -> HWIO, linear weights (out, in) -> (in, out); resampling-filter
    buffers are dropped (they are fixed by the config). Missing, unexpected or mis-shaped
    entries raise one error naming them.
    """
    expected = _expected_shapes(denoiser)
    flat = {}
    for name, value in state_dict.items():
        if name.endswith("resample_filter"):
            continue
        value = np.asarray(value, np.float32)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            value = value.T
        flat[_flax_path(name)] = value
    return fitted_variables(flat, expected)


def fitted_variables(flat: dict, expected: dict, what: str = "this architecture") -> dict:
    """`{"params": ...}` from converted arrays keyed by Flax path, checked against the
    expected shapes; missing, unexpected or mis-shaped entries raise one error naming them."""
    missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
    unexpected = sorted("/".join(k) for k in flat.keys() - expected.keys())
    wrong = sorted(f"{'/'.join(k)}: {flat[k].shape} vs {expected[k]}"
                   for k in expected.keys() & flat.keys() if flat[k].shape != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"the weights do not fit {what}: "
            + "; ".join(f"{kind} {items[:5]}{' ...' if len(items) > 5 else ''}"
                        for kind, items in (("missing", missing), ("unexpected", unexpected),
                                            ("wrong shape", wrong)) if items))
    return {"params": traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})}


def _flax_path(name: str) -> tuple[str, ...]:
    # model.enc.16x16_block0.conv0.weight -> (model, enc_16x16_block0, conv0, weight)
    parts = name.split(".")
    if len(parts) > 2 and parts[1] in ("enc", "dec"):
        parts = [parts[0], f"{parts[1]}_{parts[2]}", *parts[3:]]
    return tuple(parts)


def _expected_shapes(denoiser: Denoiser) -> dict:
    cfg = denoiser.net
    x = jnp.zeros((1, cfg.img_resolution, cfg.img_resolution, cfg.in_channels))
    labels = jnp.zeros((1, cfg.label_dim)) if cfg.label_dim else None
    shapes = jax.eval_shape(lambda: denoiser.init(jax.random.key(0), x, jnp.ones(1), labels))
    return {k: v.shape for k, v in traverse_util.flatten_dict(shapes["params"]).items()}


def load_edm(path: str | os.PathLike, **arch):
    """Loads EDM weights: returns `(denoiser, variables)`.

    `path`: a state_dict (`.pt`/`.pth`, or `.npz` of arrays) under EDM's names, or an
    EDM training snapshot `network-snapshot-*.pkl` (its `ema` network is used). `arch`:
    EDMPrecond's constructor arguments under their EDM names (`model_type`,
    `img_resolution`, `img_channels`, `label_dim`, `model_channels`, `channel_mult`, ...);
    a snapshot carries them itself, and `arch` overrides them. For VP/VE snapshots the
    preconditioning follows the pickled class; otherwise pass `precond="vp"` or `"ve"`.

    `denoiser.apply(variables, x_nhwc, sigma, class_labels=None, skip_scales=None)`
    returns D(x; sigma) in NHWC.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights file at {path}: pass the path of an EDM snapshot "
                                "(network-snapshot-*.pkl) or state_dict (.pt/.pth/.npz) on this machine")
    precond = arch.pop("precond", None)
    if path.endswith(".pkl"):
        state_dict, pickled_arch, pickled_precond = read_edm_snapshot(path)
        arch = {**pickled_arch, **arch}
        precond = precond or pickled_precond
    elif path.endswith(".npz"):
        with np.load(path) as f:
            state_dict = {k.removeprefix("param/"): f[k] for k in f.files
                          if k != "config_json" and not k.startswith(("input/", "output/"))}
    elif path.endswith((".pt", ".pth")):
        import torch  # optional dependency of this loader only

        state_dict = {k: v.numpy() for k, v in torch.load(path, map_location="cpu",
                                                          weights_only=True).items()}
    else:
        raise ValueError(f"unknown weights format {path!r}; valid: .pkl (EDM snapshot), .pt, .pth, .npz")
    net, precond_kwargs = config_from_edm(**arch)
    denoiser = Denoiser(net=net, precond=precond or "edm", **precond_kwargs)
    return denoiser, convert_state_dict(state_dict, denoiser)


# ----------------------------------------------------------------------------
# Restricted unpickling of EDM snapshots.


class _PersistentObject(dict):
    """Stands in for an EDM persistent module: its class name and recorded state."""


def _reconstruct_persistent_obj(meta):
    return _PersistentObject(class_name=meta["class_name"], state=meta["state"])


class _Placeholder:
    """Stands in for any other pickled object (e.g. dnnlib.EasyDict, the loss function)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        pass

    def update(self, *args, **kwargs):
        pass


class _SnapshotUnpickler(pickle.Unpickler):
    def __init__(self, file, torch):
        super().__init__(file)
        self._torch = torch

    def find_class(self, module, name):
        torch = self._torch
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("numpy") and name in ("scalar", "dtype", "_reconstruct", "ndarray"):
            return _numpy_global(module, name)
        if module in ("dnnlib.util", "dnnlib") and name == "EasyDict":
            return dict
        return _Placeholder


def _numpy_global(module, name):
    import importlib

    return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")
                                           if module.startswith("numpy.core") else module), name)


def _load_storage_bytes(b):
    import torch

    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


def read_edm_snapshot(path: str) -> tuple[dict, dict, str]:
    """Reads `network-snapshot-*.pkl` without EDM's code: (state_dict, init kwargs, precond).

    The state_dict has EDM's names (`model.enc...`) and numpy arrays.
    """
    import torch  # optional dependency of this loader only

    with open(path, "rb") as f:
        data = _SnapshotUnpickler(f, torch).load()
    net = data.get("ema") if isinstance(data, dict) else None
    if not isinstance(net, _PersistentObject):
        raise ValueError(f"{path} is not an EDM training snapshot: expected a dict with an 'ema' "
                         "network pickled by torch_utils.persistence")
    precond = PRECOND_CLASSES.get(net["class_name"])
    if precond is None:
        raise ValueError(f"unsupported network class {net['class_name']!r} in {path}; valid: "
                         f"{', '.join(PRECOND_CLASSES)}")
    state = net["state"]
    return _module_state_dict(state), dict(state.get("_init_kwargs") or {}), precond


def _module_state_dict(state: dict, prefix: str = "") -> dict:
    """Parameters and buffers of a pickled torch module's `state` (its __dict__), recursively.

    Children are EDM persistent modules (a _PersistentObject holding their state) or plain
    torch containers such as ModuleDict (a _Placeholder holding theirs).
    """
    out = {}
    for name, tensor in [*state.get("_parameters", {}).items(), *state.get("_buffers", {}).items()]:
        if tensor is not None:
            out[prefix + name] = tensor.detach().cpu().numpy()
    for name, child in state.get("_modules", {}).items():
        child_state = child["state"] if isinstance(child, _PersistentObject) else getattr(child, "state", None)
        if child_state is not None:
            out.update(_module_state_dict(child_state, f"{prefix}{name}."))
    return out
