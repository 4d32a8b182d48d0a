"""Reading local Hugging Face model folders (diffusers' `save_pretrained` layout and
transformers' `CLIPTextModel` folders): config.json plus one *.safetensors file, read with
safetensors' numpy API (no torch), and the PyTorch -> Flax layout rules shared by the loaders
of the SD autoencoder, the SD UNet and the CLIP text encoder.

    read_pretrained_folder(path, what)  -> (config dict, {torch name: float32 numpy array})
    read_json(path)                     -> dict, {} for a missing (optional) file
    flax_path(name, ndim)               "a.blocks.0.norm.weight" -> ("a", "blocks_0", "norm", "scale")
    flax_layout(value)                  conv OIHW -> HWIO, linear (out, in) -> (in, out)
    torch_name(path), torch_layout(v)   their inverses, for
    write_pretrained_folder(path, config, state)   a folder that diffusers and the loaders read
"""
from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

# weight file names, in order of preference: diffusers' and transformers' defaults
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def weights_file(path: str) -> str:
    """The folder's safetensors file: one of WEIGHT_FILES, else its only *.safetensors file."""
    for name in WEIGHT_FILES:
        if os.path.exists(os.path.join(path, name)):
            return os.path.join(path, name)
    found = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if len(found) != 1:
        raise FileNotFoundError(
            f"expected one *.safetensors file in {path} (one of {list(WEIGHT_FILES)}), found "
            f"{[os.path.basename(f) for f in found]}; sharded or .bin checkpoints are not read: "
            "re-save the model with save_pretrained(folder, safe_serialization=True)")
    return found[0]


def read_json(path: str) -> dict:
    """A JSON file as a dict; {} if the file does not exist (optional config files)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_pretrained_folder(path: str | os.PathLike, what: str) -> tuple[dict, dict]:
    """A local model folder (config.json + *.safetensors) -> (config dict, state dict of
    float32 numpy arrays under the PyTorch names). `what` names the expected folder in the
    error raised when config.json is missing (e.g. "diffusers UNet2DConditionModel folder,
    e.g. the unet/ folder of a Stable Diffusion checkpoint")."""
    from safetensors.numpy import load_file

    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {path}: pass a local {what} (config.json + "
                                "*.safetensors), downloaded beforehand")
    config = read_json(config_path)
    state = {k: np.asarray(v, np.float32) for k, v in load_file(weights_file(path)).items()}
    return config, state


def flax_path(name: str, ndim: int) -> tuple[str, ...]:
    """A PyTorch parameter name -> the Flax path of difflax's modules, which name a list
    entry `<list>_<index>`: "down_blocks.0.attentions.1.proj_in.weight" -> ("down_blocks_0",
    "attentions_1", "proj_in", "kernel"). `weight` becomes `scale` for 1-D (norm) parameters,
    `kernel` otherwise."""
    *modules, leaf = name.split(".")
    modules = re.sub(r"\.(\d+)", r"_\1", ".".join(modules)).split(".")
    if leaf == "weight":
        leaf = "scale" if ndim == 1 else "kernel"
    return (*modules, leaf)


def flax_layout(value: np.ndarray) -> np.ndarray:
    """PyTorch weight layouts -> Flax: conv (O, I, kh, kw) -> (kh, kw, I, O), linear (out, in)
    -> (in, out); vectors unchanged."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return value.T
    return value


def torch_name(path: tuple[str, ...]) -> str:
    """`flax_path`'s inverse: ("a", "blocks_0", "norm", "scale") -> "a.blocks.0.norm.weight"
    (a list entry `<list>_<index>` becomes `<list>.<index>`, also inside a joined module name
    such as the VAE's "down_blocks_0_resnets_1"; kernel and scale become weight)."""
    *modules, leaf = path
    name = re.sub(r"_(\d+)(_|(?=\.)|$)", lambda m: f".{m[1]}{'.' if m[2] else ''}",
                  ".".join(modules))
    return f"{name}.{'weight' if leaf in ('kernel', 'scale') else leaf}"


def torch_layout(value: np.ndarray) -> np.ndarray:
    """`flax_layout`'s inverse: conv (kh, kw, I, O) -> (O, I, kh, kw), linear (in, out) ->
    (out, in); vectors unchanged."""
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value.T if value.ndim == 2 else value


def write_pretrained_folder(path: str | os.PathLike, config: dict, state: dict) -> None:
    """Writes config.json and diffusion_pytorch_model.safetensors ({torch name: array},
    float32) into the folder `path` (created): `read_pretrained_folder`'s inverse."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
              os.path.join(path, WEIGHT_FILES[0]))
