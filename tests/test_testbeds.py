"""The shipped testbeds (difflax/testbed_weights/): they load with one call and denoise their
dataset's held-out images far better than the noisy input is."""
import jax
import numpy as np

import difflax
from difflax import data


def test_the_mnist_testbed_ships_and_denoises_held_out_digits():
    config, denoiser, params = difflax.load_testbed("mnist_edm")
    assert (config.data.name, denoiser.net.img_resolution, denoiser.net.label_dim) == ("mnist", 32, 10)
    assert sum(a.size for a in jax.tree.leaves(params)) == 1_255_489
    images, labels = data.load_mnist("test", 32)
    x, y = images[:32], labels[:32]
    noise = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    sigmas = np.repeat(np.float32([0.2, 1.0, 5.0]), 32)
    xs, ys = np.concatenate([x] * 3), np.concatenate([y] * 3)
    out = jax.jit(denoiser.apply)({"params": params}, xs + sigmas[:, None, None, None]
                                  * np.concatenate([noise] * 3), sigmas, ys)
    mse = np.mean((np.asarray(out) - xs) ** 2, axis=(1, 2, 3)).reshape(3, 32).mean(1)
    # the noisy input's error is sigma^2; a trained model removes most of it at every level
    assert np.all(mse < RATIO * np.float32([0.2, 1.0, 5.0]) ** 2), mse


RATIO = 0.25
