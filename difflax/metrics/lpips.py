"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", eq. 1) in Flax, with the VGG16 and AlexNet backbones of the `lpips` package (v0.1).

    d(x0, x1) = sum_l  mean_hw  w_l . (f_l(x0) - f_l(x1))^2,

f_l the backbone's activations at 5 taps (VGG16: relu1_2, relu2_2, relu3_3, relu4_3,
relu5_3; AlexNet: relu1..relu5), each normalised to unit length over channels (eps 1e-10),
w_l >= 0 the learned linear heads (1x1 convolutions without bias). Inputs are NHWC in
[-1, 1], shifted and scaled per channel first (lpips' `ScalingLayer`, equivalent to
ImageNet mean / std normalisation of [0, 1] images); grey images are repeated to 3 channels.

`pooling="avg"` replaces the backbone's max pools by average pools, as piq's
`LPIPS(replace_pooling=True)` that rfpp trains with does; the default "max" is the `lpips`
package's network (tests/test_lpips.py checks agreement with it to 1e-4).

Weights (nothing is downloaded): the backbone from torchvision's ImageNet checkpoint
(`vgg16-397923af.pth`, `alexnet-owt-7be5be79.pth`: keys `features.<i>.weight/bias`), or a
whole `lpips.LPIPS` state dict (`net.slice<k>.<i>.*` and `lin<l>.model.1.weight`); the
linear heads from the `lpips` package's `weights/v0.1/{vgg,alex}.pth` (shipped with the
pip package, found automatically). `.npz` files with the same keys work without torch.

Parameter tree: `conv<i>/{kernel (HWIO), bias}` with i torchvision's index in `features`,
and `lin<l>` of shape (C_l,).
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from difflax.metrics.inception import resize_like_torch

__all__ = ["LPIPS", "LPIPS_NETS", "BACKBONE_URLS", "load_lpips", "random_lpips_params",
           "get_lpips_fn", "lpips_linear_heads_path"]

# torchvision `features` as (kind, index, channels, kernel, stride, padding); "tap" marks an
# LPIPS feature after the ReLU of the preceding conv.
_VGG16 = ([("conv", 0, 64, 3, 1, 1), ("conv", 2, 64, 3, 1, 1), ("tap",), ("pool", 2, 2)]
          + [("conv", 5, 128, 3, 1, 1), ("conv", 7, 128, 3, 1, 1), ("tap",), ("pool", 2, 2)]
          + [("conv", i, 256, 3, 1, 1) for i in (10, 12, 14)] + [("tap",), ("pool", 2, 2)]
          + [("conv", i, 512, 3, 1, 1) for i in (17, 19, 21)] + [("tap",), ("pool", 2, 2)]
          + [("conv", i, 512, 3, 1, 1) for i in (24, 26, 28)] + [("tap",)])
_ALEX = [("conv", 0, 64, 11, 4, 2), ("tap",), ("pool", 3, 2), ("conv", 3, 192, 5, 1, 2), ("tap",),
         ("pool", 3, 2), ("conv", 6, 384, 3, 1, 1), ("tap",), ("conv", 8, 256, 3, 1, 1), ("tap",),
         ("conv", 10, 256, 3, 1, 1), ("tap",)]
LPIPS_NETS = {"vgg": _VGG16, "alex": _ALEX}
BACKBONE_URLS = {"vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
                 "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"}
_LINEAR_URL = ("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/"
               "v0.1/{net}.pth")
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class LPIPS(nn.Module):
    """LPIPS distance: apply(params, x0 (B, H, W, C), x1 (B, H, W, C)) -> (B,); C in {1, 3}."""

    net: str = "vgg"
    pooling: str = "max"
    precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x0, x1):
        if self.net not in LPIPS_NETS:
            raise ValueError(f"unknown LPIPS net {self.net!r}; valid choices: vgg, alex")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"unknown pooling {self.pooling!r}; valid choices: max, avg")
        b = x0.shape[0]
        h = jnp.concatenate([x0, x1]).astype(jnp.float32)
        if h.shape[-1] == 1:
            h = jnp.repeat(h, 3, axis=-1)
        h = (h - _SHIFT) / _SCALE
        init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's VGG
        total, tap = 0.0, 0
        for layer in LPIPS_NETS[self.net]:
            if layer[0] == "conv":
                _, i, c, k, s, p = layer
                h = nn.relu(nn.Conv(c, (k, k), strides=s, padding=((p, p), (p, p)),
                                    kernel_init=init, precision=self.precision,
                                    name=f"conv{i}")(h))
            elif layer[0] == "pool":
                pool = nn.max_pool if self.pooling == "max" else nn.avg_pool
                h = pool(h, (layer[1], layer[1]), strides=(layer[2], layer[2]), padding="VALID")
            else:
                f = h / (jnp.sqrt(jnp.sum(h**2, axis=-1, keepdims=True)) + 1e-10)
                w = self.param(f"lin{tap}", nn.initializers.constant(1.0 / h.shape[-1]),
                               (h.shape[-1],))
                d = jnp.einsum("bhwc,c->bhw", (f[:b] - f[b:]) ** 2, w, precision=self.precision)
                total, tap = total + jnp.mean(d, axis=(1, 2)), tap + 1
        return total


def lpips_linear_heads_path(net: str) -> str | None:
    """The `lpips` pip package's v0.1 linear heads for `net`, if the package is installed."""
    try:
        import importlib.util
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", f"{net}.pth")
    return path if os.path.exists(path) else None


def _read(path: str, what: str, url: str) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"LPIPS {what} {path!r} not found; get it from {url} (torch "
                                "state dict, or .npz with the same keys) and pass its path")
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    try:
        import torch  # optional dependency, only to read .pth files
    except ImportError as e:
        raise ImportError(f"reading {path!r} needs torch; or save its tensors to .npz") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def _backbone_from_state_dict(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "features":                      # torchvision model
            index, leaf = int(parts[1]), parts[2]
        elif parts[0] == "net" and parts[1].startswith("slice"):  # lpips.LPIPS
            index, leaf = int(parts[2]), parts[3]
        else:
            continue
        if leaf == "weight":
            out.setdefault(f"conv{index}", {})["kernel"] = np.transpose(value, (2, 3, 1, 0))
        elif leaf == "bias":
            out.setdefault(f"conv{index}", {})["bias"] = value
    return out


def _heads_from_state_dict(sd: dict) -> dict:
    return {f"lin{l}": sd[f"lin{l}.model.1.weight"].reshape(-1) for l in range(5)
            if f"lin{l}.model.1.weight" in sd}


def _check(params: dict, net: str, source: str) -> dict:
    expected = jax.eval_shape(LPIPS(net).init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
                              jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))["params"]
    for name, spec in expected.items():
        got = params.get(name)
        leaves = {"": got} if not isinstance(spec, dict) else (got or {})
        specs = {"": spec} if not isinstance(spec, dict) else spec
        for leaf, s in specs.items():
            if leaves.get(leaf) is None:
                raise KeyError(f"{source} has no weights for LPIPS-{net} {name}/{leaf}; is it "
                               f"the {net} backbone ({BACKBONE_URLS[net]}) and its heads?")
            if tuple(leaves[leaf].shape) != tuple(s.shape):
                raise ValueError(f"LPIPS-{net} {name}/{leaf}: shape {leaves[leaf].shape}, "
                                 f"expected {s.shape}")
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                        {k: params[k] for k in expected})


def load_lpips(net: str = "vgg", *, backbone_path: str, linear_path: str | None = None) -> dict:
    """LPIPS params from local files: the backbone (torchvision checkpoint, or an lpips.LPIPS
    state dict) and the linear heads (default: the installed `lpips` package's v0.1 file, or
    the heads inside `backbone_path` if it is a whole lpips.LPIPS state dict)."""
    if net not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; valid choices: vgg, alex")
    sd = _read(os.fspath(backbone_path), f"{net} backbone", BACKBONE_URLS[net])
    params = _backbone_from_state_dict(sd)
    heads = _heads_from_state_dict(sd)
    if len(heads) < 5:
        linear_path = linear_path or lpips_linear_heads_path(net)
        if linear_path is None:
            raise FileNotFoundError(f"LPIPS-{net} linear heads not found: install the `lpips` pip "
                                    f"package or pass linear_path= ({_LINEAR_URL.format(net=net)})")
        heads = _heads_from_state_dict(_read(os.fspath(linear_path), f"{net} linear heads",
                                             _LINEAR_URL.format(net=net)))
    return _check({**params, **heads}, net, os.fspath(backbone_path))


def random_lpips_params(net: str = "vgg", *, seed: int = 0, linear_path: str | None = None) -> dict:
    """A random backbone (He-normal over fan-out, zero bias, as torchvision initialises VGG;
    drawn with numpy, no compilation) with the real linear heads if found (else 1 / C_l).

    Zhang et al. 2018 (Sec. 4.1, Table 4 / Fig. 4) find that features of untrained networks
    still carry perceptual signal, well below trained ones: a stand-in where the ImageNet
    backbone cannot be had.
    """
    shape = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    spec = jax.eval_shape(LPIPS(net).init, jax.random.key(0), shape, shape)["params"]
    rng = np.random.default_rng(seed)
    params = {}
    for name, leaves in spec.items():
        if name.startswith("conv"):
            k = leaves["kernel"].shape
            std = np.sqrt(2.0 / (k[0] * k[1] * k[3]))
            params[name] = {"kernel": jnp.asarray(rng.standard_normal(k) * std, jnp.float32),
                            "bias": jnp.zeros(leaves["bias"].shape, jnp.float32)}
        else:
            params[name] = jnp.full(leaves.shape, 1.0 / leaves.shape[0], jnp.float32)
    linear_path = linear_path or lpips_linear_heads_path(net)
    if linear_path is not None:
        heads = _heads_from_state_dict(_read(linear_path, f"{net} linear heads",
                                             _LINEAR_URL.format(net=net)))
        params.update({k: jnp.asarray(v, jnp.float32) for k, v in heads.items()})
    return params


def get_lpips_fn(params: dict, net: str = "vgg", *, resolution: int | None = None,
                 pooling: str = "max"):
    """fn(x0 (B, H, W, C), x1 (B, H, W, C)) in [-1, 1] -> LPIPS distance (B,).

    Images are first resized bilinearly (torch's align_corners=False) to `resolution` if
    given (rfpp: 224). Differentiable; usable inside jit / grad (params are closed over).
    """
    model = LPIPS(net, pooling)

    def fn(x0, x1):
        if resolution is not None:
            x0, x1 = resize_like_torch(x0, resolution), resize_like_torch(x1, resolution)
        return model.apply({"params": params}, x0, x1)

    return fn
