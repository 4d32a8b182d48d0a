"""Data: embedded digits, the batch iterator (seeded, resumable, flips), tfds via mock_data."""
import gc

import numpy as np
import pytest

from difflax import data


@pytest.fixture(scope="module")
def digits8():
    return data.load_digits(8)


def test_load_digits_shapes_range_labels(digits8):
    images, labels = digits8
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert labels.dtype == np.int32 and set(labels.tolist()) == set(range(10))
    big, big_labels = data.load_digits(16)
    assert big.shape == (1797, 16, 16, 1) and big.dtype == np.float32
    assert -1.0 <= big.min() and big.max() <= 1.0
    np.testing.assert_array_equal(big_labels, labels)
    # Bilinear upsampling keeps each image's mean brightness close to the original's.
    np.testing.assert_allclose(big.mean(axis=(1, 2, 3)), images.mean(axis=(1, 2, 3)), atol=0.1)


def test_load_digits_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="8, 16, 32"):
        data.load_digits(12)
    with pytest.raises(ValueError, match="power of two"):
        data.load_digits(4)


def test_unknown_dataset_names_choices():
    with pytest.raises(ValueError, match="digits, mnist, gmm, tfds:<name>"):
        data.batch_iterator("fashion_mnist", 4)
    with pytest.raises(ValueError, match="valid choices: train, test"):
        data.load_mnist("validation")


def test_mnist_is_the_idx_files_of_the_package():
    images, labels = data.load_mnist("test", resolution=28)
    assert images.shape == (10_000, 28, 28, 1) and labels.shape == (10_000,)
    # The first test digits of MNIST are 7 2 1 0 4 1 4 9 5 9; per-class counts of the test set.
    np.testing.assert_array_equal(labels[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert images.min() == -1.0 and images.max() == 1.0
    padded, _ = data.load_mnist("test")  # 32x32: 2 background pixels each side
    np.testing.assert_array_equal(padded[:, 2:30, 2:30], images)
    assert (padded[:, :2] == -1).all() and (padded[:, :, 30:] == -1).all()
    batch, y = next(data.batch_iterator("mnist", 8, split="test", seed=1))
    assert batch.shape == (8, 32, 32, 1) and y.dtype == np.int32


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_digits_batches_are_resumable_and_seeded():
    run = _take(data.batch_iterator("digits", 16, seed=3, resolution=8), 6)
    resumed = _take(data.batch_iterator("digits", 16, seed=3, resolution=8, start_step=4), 2)
    for (x, y), (x2, y2) in zip(run[4:], resumed):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    other = next(data.batch_iterator("digits", 16, seed=4, resolution=8))
    assert not np.array_equal(other[0], run[0][0])


def test_digits_epoch_is_a_permutation_without_flips(digits8):
    images, labels = digits8
    # 1797 = 3 * 599: three batches are exactly one epoch.
    x, y = map(np.concatenate, zip(*_take(data.batch_iterator("digits", 599, resolution=8), 3)))
    np.testing.assert_array_equal(np.sort(y), np.sort(labels))
    np.testing.assert_allclose(np.sort(x.sum(axis=(1, 2, 3))),
                               np.sort(images.sum(axis=(1, 2, 3))), rtol=1e-6)
    # Not flipped: every batch image is a dataset image as stored.
    flat = {img.tobytes() for img in images}
    assert all(img.tobytes() in flat for img in x)


def test_random_flip_flips_about_half(digits8):
    images, _ = digits8
    x, _ = next(data.batch_iterator("digits", 256, resolution=8, random_flip=True))
    stored = {img.tobytes() for img in images}
    flipped = np.mean([img.tobytes() not in stored for img in x])
    assert 0.3 < flipped < 0.7  # symmetric digits flip onto themselves, so a bit under 1/2


def test_process_rows_partition_the_global_batch():
    full = next(data.batch_iterator("digits", 8, seed=1, resolution=8))
    parts = [next(data.batch_iterator("digits", 8, seed=1, resolution=8, process_index=i,
                                      process_count=2)) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), full[0])


def test_gmm_batches():
    mixture = data.gmm(dim=3, num_components=5, seed=1)
    x, y = next(data.batch_iterator("gmm", 4096, mixture=mixture, seed=2))
    assert x.shape == (4096, 3) and x.dtype == np.float32 and y.max() < 5
    # Each point lies near its component mean (std 0.3 per coordinate).
    resid = x - np.asarray(mixture.means)[y]
    np.testing.assert_allclose(resid.std(axis=0), 0.3, rtol=0.1)
    again = _take(data.batch_iterator("gmm", 16, mixture=mixture, seed=2, start_step=1), 1)[0]
    np.testing.assert_array_equal(again[0], _take(
        data.batch_iterator("gmm", 16, mixture=mixture, seed=2), 2)[1][0])
    assert data.dataset_spec("gmm", mixture=mixture) == data.DatasetSpec((3,), 5)


def test_dataset_spec_digits():
    assert data.dataset_spec("digits", resolution=32) == data.DatasetSpec((32, 32, 1), 10)


def test_tfds_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    iterators = []
    try:
        with tfds.testing.mock_data(num_examples=10):
            it = data.batch_iterator("tfds:cifar10", 4, seed=1)
            iterators.append(it)
            run = _take(it, 6)  # 10 examples, 4 per batch: batches cross epochs
            x, y = run[0]
            assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32
            assert -1.0 <= x.min() and x.max() <= 1.0 and y.dtype == np.int32
            resumed = data.batch_iterator("tfds:cifar10", 4, seed=1, start_step=3)
            iterators.append(resumed)
            for (xa, ya), (xb, yb) in zip(run[3:], _take(resumed, 3)):
                np.testing.assert_array_equal(xa, xb)
                np.testing.assert_array_equal(ya, yb)
            epochs = data.batch_iterator("tfds:cifar10", 10, seed=1)  # one epoch per batch
            iterators.append(epochs)
            (xa, _), (xb, _) = _take(epochs, 2)
            sums_a, sums_b = xa.sum(axis=(1, 2, 3)), xb.sum(axis=(1, 2, 3))
            np.testing.assert_allclose(np.sort(sums_a), np.sort(sums_b), rtol=1e-5)
            assert not np.allclose(sums_a, sums_b)  # each epoch is reshuffled
            small = data.batch_iterator("tfds:imagenet_resized/64x64", 2, resolution=16)
            iterators.append(small)
            assert next(small)[0].shape == (2, 16, 16, 3)
            assert data.dataset_spec("tfds:cifar10") == data.DatasetSpec((32, 32, 3), 10)
    finally:
        for it in iterators:  # tf.data iterators left open hang interpreter exit
            it.close()
        del iterators
        gc.collect()
