"""Temporary memory XLA plans for the compiled EDM-loss gradient (`memory_analysis()`, no
run) of the CIFAR-10 DDPM++ (configs/cifar10_ddpmpp.py, 55.7M parameters), with
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
    print(f"{jax.devices()[0].platform}, batch {batch}")
    for remat in (False, True):
        d = dataclasses.replace(den, net=dataclasses.replace(den.net, remat=remat))
        grad = jax.jit(jax.grad(get_edm_loss_fn(d))).lower(params, (x, y), jax.random.key(2))
        m = grad.compile().memory_analysis()
        print(f"remat={remat}: temporaries {m.temp_size_in_bytes / 2**20:.0f} MiB, arguments "
              f"{m.argument_size_in_bytes / 2**20:.0f} MiB, output "
              f"{m.output_size_in_bytes / 2**20:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
