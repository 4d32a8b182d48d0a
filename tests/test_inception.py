"""The Flax FID Inception against pytorch-fid's network, with the same random weights."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pf = pytest.importorskip("pytorch_fid.inception")

import jax.numpy as jnp  # noqa: E402

from difflax.metrics import convert_inception_weights, inception_features, load_inception  # noqa: E402
from difflax.metrics.inception import resize_like_torch  # noqa: E402
from fid_stand_in import random_fid_state_dict  # noqa: E402


def _images(seed):
    """Two small NHWC images in [-1, 1] (resized to 299 inside the networks)."""
    return np.random.default_rng(seed).uniform(-1, 1, (2, 24, 24, 3)).astype(np.float32)


def _to_torch(images):
    """NHWC [-1, 1] -> NCHW [0, 1], pytorch-fid's input convention."""
    return torch.from_numpy((images.transpose(0, 3, 1, 2) + 1) / 2)


@pytest.fixture(scope="module")
def torch_net(tmp_path_factory):
    """pytorch-fid's InceptionV3 (pool block) with random weights, BN statistics calibrated
    on a random batch so activations stay O(1) through all layers; and its .pth file."""
    orig = pf.load_state_dict_from_url
    pf.load_state_dict_from_url = random_fid_state_dict
    try:
        net = pf.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    finally:
        pf.load_state_dict_from_url = orig
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: running stats = this batch's statistics
    net.train()
    with torch.no_grad():
        net(_to_torch(_images(1)))
        for m in bns:  # no near-constant channels: they amplify float32 rounding ~100-fold
            m.running_var.clamp_(min=0.25)
    net.eval()
    inception = net.blocks  # save with torchvision's names, as in the released .pth file
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", None, "Conv2d_3b_1x1",
             "Conv2d_4a_3x3", None, "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
             "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", None]
    modules = [m for block in inception for m in block]
    sd = {}
    for name, m in zip(names, modules):
        if name is not None:
            sd.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(sd, path)
    wrapper_path = path.with_name("wrapper.pth")
    torch.save(net.state_dict(), wrapper_path)
    return net, str(path), str(wrapper_path)


def test_pool_features_match_pytorch_fid(torch_net):
    net, path, _ = torch_net
    params = load_inception(path)
    images = _images(2)  # same distribution as the BN calibration batch, another draw
    with torch.no_grad():
        expected = net(_to_torch(images))[0][:, :, 0, 0].numpy()
    got = np.asarray(inception_features(params, jnp.asarray(images)))
    assert got.shape == (2, 2048)
    assert 0.05 < np.abs(expected).mean() < 5  # a meaningful comparison, not one of zeros
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_loader_accepts_wrapper_keys_and_npz(torch_net, tmp_path):
    _, path, wrapper_path = torch_net
    params = load_inception(path)
    npz = tmp_path / "inception.npz"
    convert_inception_weights(path, npz)
    for other in (load_inception(wrapper_path), load_inception(npz)):
        a, b = jax_leaves(params), jax_leaves(other)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("size", [13, 40])
def test_resize_matches_torch_interpolate(size):
    x = np.random.default_rng(size).normal(size=(1, 3, size, size)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=(29, 29), mode="bilinear",
                                               align_corners=False).numpy()
    got = np.asarray(resize_like_torch(jnp.asarray(x.transpose(0, 2, 3, 1)), 29)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_missing_weights_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        load_inception(tmp_path / "nope.pth")


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 6 samples, 16-d: rank-deficient
def test_fid_metric_streams_inception_features(torch_net):
    """The ``fid`` metric of evaluate_samples equals the Frechet distance of the features
    computed in one go (same (2, 24, 24, 3) shape as above: no new compilation). Only the
    first 16 features enter the distance: a 2048-d sqrtm takes a minute on this CPU."""
    import jax

    from difflax.metrics import (evaluate_samples, frechet_distance, inception_frechet_metric,
                                 mean_cov, quantize_to_uint8_levels)

    params = load_inception(torch_net[1])
    batches = [_images(10 + i) for i in range(3)]
    d = 16
    ref = mean_cov(np.concatenate([np.asarray(inception_features(params, b))[:, :d]
                                   for b in batches[:2]]))
    fid = inception_frechet_metric(params, (np.zeros(2048), np.eye(2048)), quantize=True)
    metric = fid._replace(feature_fn=lambda x: fid.feature_fn(x)[:, :d], mu=ref[0], sigma=ref[1])
    calls = iter(batches)
    out = evaluate_samples(lambda key, n: jnp.asarray(next(calls)), key=jax.random.key(0),
                           num_samples=6, batch_size=2, frechet_metrics=[metric], progress=False)
    feats = np.concatenate([np.asarray(inception_features(params, quantize_to_uint8_levels(b)))
                            for b in batches])[:, :d]
    assert out["fid"] == pytest.approx(frechet_distance(*mean_cov(feats), *ref), rel=1e-6)
