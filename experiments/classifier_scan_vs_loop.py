"""Why `difflax.metrics.classifier.train_classifier` loops over a jitted step: the MNIST CNN's
training step (AdamW, batch 128 drawn from the 60k training digits) inside one `lax.scan`
against the same step jitted alone and called from Python, timed in one process.

    python experiments/classifier_scan_vs_loop.py [--steps 50]

Prints seconds per step of each and their ratio.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import optax

from difflax.data import load_mnist
from difflax.metrics.mnist_features import MnistClassifier


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    steps = p.parse_args().steps
    x, y = (jnp.asarray(a) for a in load_mnist("train", 32))
    model, tx = MnistClassifier(), optax.adamw(1e-3)
    params = model.init(jax.random.key(0), x[:1])["params"]

    def step(p, o, i, xs, ys):
        idx = jax.random.randint(jax.random.fold_in(jax.random.key(0), i), (128,), 0, len(xs))
        loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            model.apply({"params": q}, xs[idx])[1], ys[idx]).mean()
        u, o = tx.update(jax.grad(loss)(p), o, p)
        return optax.apply_updates(p, u), o

    scan = jax.jit(lambda p, xs, ys: jax.lax.scan(
        lambda c, i: (step(*c, i, xs, ys), None), (p, tx.init(p)), jnp.arange(steps))[0][0])
    compiled = scan.lower(params, x, y).compile()
    tic = time.perf_counter()
    jax.block_until_ready(compiled(params, x, y))
    in_scan = (time.perf_counter() - tic) / steps
    one = jax.jit(step)
    p, o = one(params, tx.init(params), 0, x, y)  # compile
    jax.block_until_ready(p)
    tic = time.perf_counter()
    for i in range(1, steps + 1):
        p, o = one(p, o, i, x, y)
    jax.block_until_ready(p)
    in_loop = (time.perf_counter() - tic) / steps
    print(f"{jax.devices()[0].platform}: lax.scan {in_scan:.3f} s/step, Python loop "
          f"{in_loop:.3f} s/step, ratio {in_scan / in_loop:.1f}")


if __name__ == "__main__":
    main()
