"""The shipped testbeds (difflax/testbed_weights/): they load with one call and denoise their
dataset's held-out images far better than the noisy input is, using the class label."""
import jax
import numpy as np

import difflax
from difflax import data

SIGMAS = np.float32([0.2, 1.0, 5.0])


def test_the_mnist_testbed_ships_and_denoises_held_out_digits():
    config, denoiser, params = difflax.load_testbed("mnist_edm")
    assert (config.data.name, denoiser.net.img_resolution, denoiser.net.label_dim) == ("mnist", 32, 10)
    assert sum(a.size for a in jax.tree.leaves(params)) == 1_259_745
    images, labels = data.load_mnist("test", 32)  # never seen in training
    x, y = np.concatenate([images[:32]] * 3), np.concatenate([labels[:32]] * 3)
    sigma = np.repeat(SIGMAS, 32)
    noise = np.random.default_rng(0).normal(size=images[:32].shape).astype(np.float32)
    noisy = x + sigma[:, None, None, None] * np.concatenate([noise] * 3)
    apply = jax.jit(denoiser.apply)

    def mse(labels):
        out = np.asarray(apply({"params": params}, noisy, sigma, labels))
        return np.mean((out - x) ** 2, axis=(1, 2, 3)).reshape(3, 32).mean(1)

    right, wrong = mse(y), mse((y + 1) % 10)
    # the noisy input's error is sigma^2; the trained model removes most of it (measured at
    # shipping: 0.057, 0.022, 0.005 of it) ...
    assert np.all(right < 0.15 * SIGMAS ** 2), right / SIGMAS ** 2
    # ... and at high noise it relies on the label (a wrong label: 0.238 against 0.121)
    assert right[2] < 0.7 * wrong[2], (right, wrong)
