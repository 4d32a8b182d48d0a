"""LPIPS in Flax against the `lpips` package (torch CPU) with identical weights.

ImageNet backbone weights are not available offline, so both sides share a random backbone
(`lpips.LPIPS(pnet_rand=True)`) and the package's real v0.1 linear heads.
"""
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
lpips = pytest.importorskip("lpips")

from difflax.metrics.lpips import (get_lpips_fn, load_lpips, lpips_linear_heads_path,
                                  random_lpips_params)


def _torch_lpips(net):
    torch.manual_seed(0)
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    return model


def _images(seed, n, size, channels=3):
    rng = np.random.default_rng(seed)
    base = rng.uniform(-1, 1, (n, size, size, channels)).astype(np.float32)
    return base, np.clip(base + 0.3 * rng.standard_normal(base.shape), -1, 1).astype(np.float32)


@pytest.mark.parametrize("net,size", [("vgg", 32), ("alex", 64)])
def test_matches_lpips_package(tmp_path, net, size):
    model = _torch_lpips(net)
    # the backbone as torchvision names it (features.<i>.*), heads from the package's file
    backbone = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": v
                for k, v in model.state_dict().items() if k.startswith("net.slice")}
    torch.save(backbone, tmp_path / "backbone.pth")
    params = load_lpips(net, backbone_path=str(tmp_path / "backbone.pth"))
    x0, x1 = _images(0, 3, size)
    with torch.no_grad():
        want = model(torch.from_numpy(x0).permute(0, 3, 1, 2),
                     torch.from_numpy(x1).permute(0, 3, 1, 2)).reshape(-1).numpy()
    got = np.asarray(jax.jit(get_lpips_fn(params, net))(x0, x1))
    assert want.min() > 1e-3  # a non-trivial distance
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # a whole lpips.LPIPS state dict (backbone + heads in one file) loads the same params
    torch.save(model.state_dict(), tmp_path / "whole.pth")
    same = load_lpips(net, backbone_path=str(tmp_path / "whole.pth"))
    jax.tree.map(np.testing.assert_array_equal, same, params)


def test_identical_images_have_zero_distance_and_grey_is_repeated():
    params = random_lpips_params("alex", seed=0)
    fn = jax.jit(get_lpips_fn(params, "alex"))
    x0, x1 = _images(1, 2, 64, channels=1)
    np.testing.assert_allclose(np.asarray(fn(x0, x0)), 0.0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(fn(x0, x1)),
                               np.asarray(fn(np.repeat(x0, 3, -1), np.repeat(x1, 3, -1))),
                               rtol=1e-6)


def test_missing_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="download.pytorch.org/models/vgg16"):
        load_lpips("vgg", backbone_path=str(tmp_path / "vgg16.pth"))
    assert lpips_linear_heads_path("alex").endswith(os.path.join("v0.1", "alex.pth"))
