"""The 3x3 convolution's weight gradient in XLA on the CPU: XLA's own against the same sum
written as matrix products (README, "Speed against the PyTorch references"), and where
`difflax.models.layers.conv2d` uses which (`matmul_weight_derivative`).

For the CIFAR DDPM++'s widest convolution (256 channels, 32x32, batch 16, NHWC / HWIO),
dW[i, j] = sum over images and pixels of x_padded[:, i:i+32, j:j+32]^T g, 9 products of
(256 x 16384) @ (16384 x 256). Times (median of --repeats calls after a warm-up) of:
XLA's weight gradient (`jax.vjp` of the convolution), image patches + one einsum, 9 shifted
slices + einsums, and one of the 9 products on contiguous arrays (the floor: x 9 is what the
whole gradient would cost at that speed). Prints the maximum difference to XLA's gradient.
Then, over convolution shapes (batch, width, channels), the time of one gradient of
sum(conv(x, w)^2) w.r.t. x and w with XLA's derivatives and with `conv2d`'s matrix-product
weight derivative (forced, whatever `matmul_weight_derivative` says), and what
`matmul_weight_derivative` picks.

    python experiments/conv_weight_grad.py [--repeats 5]
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from difflax.models import layers

B, C, R = 16, 256, 32
DN = ("NHWC", "HWIO", "NHWC")
SHAPES = [(64, 16, 16), (64, 16, 32), (8, 32, 64), (16, 32, 64), (16, 32, 96), (16, 16, 128),
          (16, 32, 128), (16, 8, 256), (16, 16, 256), (16, 24, 256), (16, 32, 256), (4, 64, 128),
          (2, 64, 320)]  # (batch, width = height, channels in = out)


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=DN)


def xla_weight_grad(x, g):
    w = jnp.zeros((3, 3, C, C), x.dtype)
    return jax.vjp(lambda w: conv(x, w), w)[1](g)[0]


def patches_weight_grad(x, g):
    p = jax.lax.conv_general_dilated_patches(x, (3, 3), (1, 1), [(1, 1)] * 2,
                                             dimension_numbers=DN)  # features ordered (c, kh, kw)
    return jnp.einsum("nhwk,nhwo->ko", p, g).reshape(C, 3, 3, C).transpose(1, 2, 0, 3)


def shifted_weight_grad(x, g):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.stack([jnp.stack([jnp.einsum("nhwi,nhwo->io", xp[:, i:i + R, j:j + R], g)
                                 for j in range(3)]) for i in range(3)])


def one_product(x, g):
    return x.reshape(-1, C).T @ g.reshape(-1, C)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def matmul_conv(x, w, padding):
    """conv2d with the matrix-product weight derivative at every shape (padding 1)."""
    return conv(x, w)


@matmul_conv.defjvp
def _matmul_conv_jvp(padding, primals, tangents):
    (x, w), (x_dot, w_dot) = primals, tangents
    return conv(x, w), conv(x_dot, w) + layers.weight_linear(x, w_dot, padding)


def shape_grid(repeats):
    print("\n| batch x width^2 x channels | XLA ms | matrix products ms | ratio | conv2d uses |"
          "\n|---|---|---|---|---|")
    for b, r, c in SHAPES:
        x = jax.random.normal(jax.random.key(0), (b, r, r, c))
        w = jax.random.normal(jax.random.key(1), (3, 3, c, c)) / np.sqrt(9 * c)
        ms = [median_ms(jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w, 1) ** 2), (0, 1))),
                        (x, w), repeats) for f in (lambda x, w, p: conv(x, w), matmul_conv)]
        uses = "products" if layers.matmul_weight_derivative(x.shape, w.shape) else "XLA"
        print(f"| {b} x {r}^2 x {c} | {ms[0]:.1f} | {ms[1]:.1f} | {ms[1] / ms[0]:.2f} | {uses} |",
              flush=True)


def median_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - tic)
    return 1000 * float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    x = jax.random.normal(jax.random.key(0), (B, R, R, C))
    g = jax.random.normal(jax.random.key(1), (B, R, R, C))
    ref = jax.jit(xla_weight_grad)(x, g)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print("| weight gradient | ms | max abs diff to XLA's |\n|---|---|---|")
    for name, fn in (("XLA (vjp of the convolution)", xla_weight_grad),
                     ("patches + einsum", patches_weight_grad),
                     ("9 shifted slices + einsums", shifted_weight_grad),
                     ("one of the 9 products, contiguous (x 9 = the floor)", one_product)):
        f = jax.jit(fn)
        out = f(x, g)
        diff = "-" if out.shape != ref.shape else f"{float(jnp.abs(out - ref).max()):.1e}"
        print(f"| {name} | {median_ms(f, (x, g), args.repeats):.1f} | {diff} |", flush=True)
    shape_grid(args.repeats)


if __name__ == "__main__":
    main()
