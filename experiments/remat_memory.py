"""The residuals JAX saves for the backward pass (those of `jax.vjp`'s function) and the
temporary memory XLA plans for the compiled EDM-loss gradient (`memory_analysis()`; nothing
is run) of the CIFAR-10 DDPM++ (configs/cifar10_ddpmpp.py, 55.7M parameters), with
`UNetConfig.remat` off and on; prints one line each. Compiles twice (about a minute each on
a 2-core CPU); runs unchanged on a GPU or TPU.

    python experiments/remat_memory.py [BATCH]     # default 16
"""
import dataclasses
import sys

import jax
import jax.numpy as jnp

from difflax import configs
from difflax.training import get_edm_loss_fn, get_init_params_fn


def main():
    config = configs.load_config("configs/cifar10_ddpmpp.py")
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    den = configs.denoiser_from_config(config)
    params = jax.eval_shape(get_init_params_fn(den, jax.random.key(0)))
    x = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32) if den.net.label_dim else None
    key = jax.random.key(2)
    print(f"{jax.devices()[0].platform}, batch {batch}")
    for remat in (False, True):
        d = dataclasses.replace(den, net=dataclasses.replace(den.net, remat=remat))
        loss = get_edm_loss_fn(d)
        # what JAX saves for the backward pass: the residuals held by jax.vjp's function
        vjp_fn = jax.eval_shape(lambda p, b: jax.vjp(lambda q: loss(q, b, key), p)[1],
                                params, (x, y))
        saved = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(vjp_fn))
        m = jax.jit(jax.grad(loss)).lower(params, (x, y), key).compile().memory_analysis()
        print(f"remat={remat}: residuals {saved / 2**20:.0f} MiB; XLA's plan: temporaries "
              f"{m.temp_size_in_bytes / 2**20:.0f} MiB, arguments "
              f"{m.argument_size_in_bytes / 2**20:.0f} MiB, output "
              f"{m.output_size_in_bytes / 2**20:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
