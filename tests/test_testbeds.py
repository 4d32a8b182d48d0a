"""The shipped testbeds (difflax/testbed_weights/): they load with one call and denoise their
dataset's held-out images far better than the noisy input is, using the class label."""
import jax
import numpy as np

import difflax
from difflax import data
from difflax.testbeds import denoising_error

SIGMAS = np.float32([0.2, 1.0, 5.0])


def test_the_mnist_testbed_ships_and_denoises_held_out_digits():
    config, denoiser, params = difflax.load_testbed("mnist_edm")
    assert (config.data.name, denoiser.net.img_resolution, denoiser.net.label_dim) == ("mnist", 32, 10)
    assert sum(a.size for a in jax.tree.leaves(params)) == 1_259_745
    images, labels = data.load_mnist("test", 32)  # never seen in training
    x, y = images[:32], labels[:32]
    right = denoising_error(denoiser, params, x, y, SIGMAS)
    wrong = denoising_error(denoiser, params, x, (y + 1) % 10, SIGMAS)
    # the noisy input's error is sigma^2; the trained model removes most of it (measured at
    # shipping: 0.057, 0.022, 0.005 of it) ...
    assert np.all(right < 0.15 * SIGMAS ** 2), right / SIGMAS ** 2
    # ... and at high noise it relies on the label (a wrong label: 0.238 against 0.121)
    assert right[2] < 0.7 * wrong[2], (right, wrong)
