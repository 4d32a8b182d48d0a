"""Inception-v3 as the FID network: the 2015-12-05 TensorFlow graph, in Flax.

This is the network of pytorch-fid (``pytorch_fid.inception.fid_inception_v3``) and EDM:
torchvision's Inception-v3 with the blocks patched to match TensorFlow's FID graph
(pytorch-fid's FIDInceptionA / C / E_1 / E_2):

- the 3x3 average pools inside the A, C and E blocks divide by the number of *valid*
  pixels (TensorFlow's SAME average pool; ``count_include_pad=False``);
- the last block (Mixed_7c, "E_2") uses a 3x3 *max* pool in its pool branch;
- every convolution is conv (no bias) -> BatchNorm (eps 1e-3, inference statistics) -> ReLU.

Features are the 2048-d output of the final global average pool, as used for FID
(Heusel et al. 2017). Weights come from pytorch-fid's ``pt_inception-2015-12-05-*.pth``
(a torch ``state_dict``) or from an ``.npz`` holding the same names
(:func:`convert_inception_weights`); nothing is downloaded.

Parameter tree: the torch module path with ``conv.weight`` -> ``conv/kernel`` (HWIO) and
``bn.{weight, bias, running_mean, running_var}`` -> ``bn/{scale, bias, mean, var}``.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "FID_WEIGHTS_URL",
    "InceptionV3FID",
    "load_inception",
    "convert_inception_weights",
    "inception_features",
]

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
_INPUT_SIZE = 299
_BN_EPS = 1e-3


# ----------------------------------------------------------------------------
# Layers


class _BatchNorm(nn.Module):
    """Inference-only batch norm; the torch running statistics are plain parameters."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + _BN_EPS)) + bias


class _BasicConv(nn.Module):
    """torchvision's BasicConv2d: conv (no bias, symmetric zero padding) -> BN -> ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=jax.lax.Precision.HIGHEST, name="conv")(x)
        return nn.relu(_BatchNorm(name="bn")(x))


def _conv(features, kernel, stride=1, padding=0, *, name):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    return _BasicConv(features, kernel, stride, padding, name=name)


def _avg_pool_3x3_same(x):
    """3x3 / stride 1 / pad 1 average pool that ignores the padding (TF SAME)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


# ----------------------------------------------------------------------------
# Inception blocks (torchvision names; FID patches as in pytorch-fid)


class _InceptionA(nn.Module):  # FIDInceptionA
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _conv(64, 1, name="branch1x1")(x)
        b5 = _conv(48, 1, name="branch5x5_1")(x)
        b5 = _conv(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = _conv(64, 1, name="branch3x3dbl_1")(x)
        b3 = _conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = _conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = _conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _InceptionB(nn.Module):  # Mixed_6a, unpatched
    @nn.compact
    def __call__(self, x):
        b3 = _conv(384, 3, stride=2, name="branch3x3")(x)
        bd = _conv(64, 1, name="branch3x3dbl_1")(x)
        bd = _conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = _conv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class _InceptionC(nn.Module):  # FIDInceptionC
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = _conv(192, 1, name="branch1x1")(x)
        b7 = _conv(c7, 1, name="branch7x7_1")(x)
        b7 = _conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = _conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = _conv(c7, 1, name="branch7x7dbl_1")(x)
        bd = _conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = _conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = _conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = _conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = _conv(192, 1, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _InceptionD(nn.Module):  # Mixed_7a, unpatched
    @nn.compact
    def __call__(self, x):
        b3 = _conv(192, 1, name="branch3x3_1")(x)
        b3 = _conv(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = _conv(192, 1, name="branch7x7x3_1")(x)
        b7 = _conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = _conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = _conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class _InceptionE(nn.Module):  # FIDInceptionE_1 (pool="avg") / FIDInceptionE_2 (pool="max")
    pool: str

    @nn.compact
    def __call__(self, x):
        b1 = _conv(320, 1, name="branch1x1")(x)
        b3 = _conv(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([_conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              _conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = _conv(448, 1, name="branch3x3dbl_1")(x)
        bd = _conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([_conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              _conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3_same(x)
        else:  # the FID graph's quirk: max pool (padding with -inf) in the last block
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        bp = _conv(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """The FID Inception-v3 up to its 2048-d global average pool.

    Input: (N, 299, 299, 3) float32 in the network's range [-1, 1] (already resized).
    Output: (N, 2048) pool features.
    """

    @nn.compact
    def __call__(self, x):
        x = _conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)  # 149
        x = _conv(32, 3, name="Conv2d_2a_3x3")(x)  # 147
        x = _conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)  # 73
        x = _conv(80, 1, name="Conv2d_3b_1x1")(x)
        x = _conv(192, 3, name="Conv2d_4a_3x3")(x)  # 71
        x = _max_pool_3x3_s2(x)  # 35
        x = _InceptionA(32, name="Mixed_5b")(x)
        x = _InceptionA(64, name="Mixed_5c")(x)
        x = _InceptionA(64, name="Mixed_5d")(x)
        x = _InceptionB(name="Mixed_6a")(x)  # 17
        x = _InceptionC(128, name="Mixed_6b")(x)
        x = _InceptionC(160, name="Mixed_6c")(x)
        x = _InceptionC(160, name="Mixed_6d")(x)
        x = _InceptionC(192, name="Mixed_6e")(x)
        x = _InceptionD(name="Mixed_7a")(x)  # 8
        x = _InceptionE("avg", name="Mixed_7b")(x)
        x = _InceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------
# Weights

# pytorch-fid's InceptionV3 wrapper stores the same modules as ``blocks.<i>.<j>``.
_WRAPPER_NAMES = {
    "blocks.0.0": "Conv2d_1a_3x3", "blocks.0.1": "Conv2d_2a_3x3", "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1", "blocks.1.1": "Conv2d_4a_3x3",
    **{f"blocks.2.{i}": n for i, n in enumerate(
        ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"])},
    "blocks.3.0": "Mixed_7a", "blocks.3.1": "Mixed_7b", "blocks.3.2": "Mixed_7c",
}
_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _missing_file_error(path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Inception weights {path!r} not found. difflax never downloads at run time: get "
        f"pytorch-fid's FID Inception weights from {FID_WEIGHTS_URL} (the 2015-12-05 TensorFlow "
        "FID graph ported by mseitzer/pytorch-fid), save the file locally and pass its path; "
        "to avoid needing torch, convert it once with "
        "difflax.metrics.convert_inception_weights(pth, 'inception_fid.npz')."
    )


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise _missing_file_error(path)
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    try:
        import torch  # only here: torch is an optional dependency
    except ImportError as e:
        raise ImportError(f"reading {path!r} needs torch; or convert it to .npz where torch is "
                          "installed with difflax.metrics.convert_inception_weights") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and not any(k.endswith(".weight") for k in sd):
        sd = sd["state_dict"]
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def _to_flax_params(state_dict: dict[str, np.ndarray]) -> dict:
    expected = traverse_util.flatten_dict(
        jax.eval_shape(InceptionV3FID().init, jax.random.key(0),
                       jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))["params"])
    flat = {}
    for key, value in state_dict.items():
        for old, new in _WRAPPER_NAMES.items():
            if key.startswith(old + "."):
                key = new + key[len(old):]
                break
        *module, kind, leaf = key.split(".")
        if kind == "conv" and leaf == "weight":
            flat[(*module, "conv", "kernel")] = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
        elif kind == "bn" and leaf in _BN_NAMES:
            flat[(*module, "bn", _BN_NAMES[leaf])] = value
        # anything else (fc.*, num_batches_tracked) is not part of the pool features
    missing = sorted("/".join(k) for k in expected if k not in flat)
    if missing:
        raise KeyError(f"Inception state dict lacks {len(missing)} weights, e.g. {missing[:3]}; "
                       f"is it pytorch-fid's pt_inception-2015-12-05 file ({FID_WEIGHTS_URL})?")
    for k, spec in expected.items():
        if flat[k].shape != spec.shape:
            raise ValueError(f"{'/'.join(k)}: shape {flat[k].shape}, expected {spec.shape}")
    return traverse_util.unflatten_dict({k: jnp.asarray(flat[k], jnp.float32) for k in expected})


def load_inception(path: str | os.PathLike) -> dict:
    """Loads FID Inception weights into a Flax parameter tree.

    Args:
      path: pytorch-fid's ``pt_inception-2015-12-05-*.pth`` (torch state_dict; needs torch),
        or an ``.npz`` with the same keys (e.g. written by :func:`convert_inception_weights`).
        The keys of torchvision's ``Inception3`` and of pytorch-fid's ``InceptionV3``
        wrapper (``blocks.i.j.*``) are both accepted.
    Returns:
      ``params`` for :func:`inception_features`.
    Raises:
      FileNotFoundError saying where the file comes from when ``path`` does not exist.
    """
    return _to_flax_params(_read_state_dict(os.fspath(path)))


def convert_inception_weights(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Converts a torch ``.pth`` of the FID Inception to an ``.npz`` with the same keys
    (run once where torch is installed; afterwards torch is not needed)."""
    np.savez(dst, **_read_state_dict(os.fspath(src)))


def resize_like_torch(images: jax.Array, size: int) -> jax.Array:
    """(N, H, W, C) -> (N, size, size, C) as ``F.interpolate(mode='bilinear',
    align_corners=False)`` (half-pixel centres, no antialiasing when shrinking)."""
    if images.shape[1:3] == (size, size):
        return images
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear",
                            antialias=False, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def inception_features(params, images) -> jax.Array:
    """FID pool features of NHWC images in [-1, 1], any resolution; returns (N, 2048).

    Follows pytorch-fid's input path for images x01 in [0, 1]: bilinear resize to 299x299
    (``F.interpolate(mode='bilinear', align_corners=False)``, no antialiasing), then
    ``2 * x01 - 1``. Here x01 = (images + 1) / 2. Grayscale (C = 1) images are repeated to
    three channels. Quantise to 8 bits beforehand if comparing with statistics computed
    from PNG files (see :func:`difflax.metrics.quantize_to_uint8_levels`).
    """
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected NHWC images with 1 or 3 channels, got {x.shape}")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x01 = resize_like_torch((x + 1.0) / 2.0, _INPUT_SIZE)
    return InceptionV3FID().apply({"params": params}, 2.0 * x01 - 1.0)
