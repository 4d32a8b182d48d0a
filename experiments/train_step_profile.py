"""Where the digits DDPM++'s training step spends its time on the CPU, per kind of operation,
in difflax (XLA) and in EDM's PyTorch code.

difflax: the jitted loss + gradient (`jax.value_and_grad` of `get_edm_loss_fn`, the step's
forward + backward) is traced with `jax.profiler` over --calls calls; each executed XLA
operation is looked up in the compiled HLO and put in one class:
  - convolution, kernel window (forward, input gradient): a convolution whose window is at
    most 3x3 (the networks' kernels);
  - convolution, image window (weight gradient): the weight gradient, which XLA writes as a
    convolution whose window is the whole image;
  - transposes: fusions that copy an array into another layout (for the weight gradients'
    operands), with whatever elementwise work XLA fused into them;
  - reductions, dots (attention and linear layers), elementwise (the rest: SiLU, GroupNorm's
    normalisation, sums, ...).
PyTorch: `torch.profiler` over the same number of EDMLoss forward + backward calls, self CPU
time per ATen operator. Both: ms per call.

    python experiments/speed.py ... measures the ratios; this script the split:
    python experiments/train_step_profile.py --edm PATH/TO/edm [--calls 5]
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp

CLASSES = ("convolution, kernel window (forward, input gradient)",
           "convolution, image window (weight gradient)", "transposes", "reductions", "dots",
           "elementwise and other")


def hlo_classes(hlo_text: str) -> dict[str, str]:
    """{instruction name: class} for the fusions and operations of a compiled HLO module."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(
        r"^%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo_text, re.M | re.S)}
    classes = {}
    instruction = r"^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*? (\w[\w-]*)\(([^\n]*)"
    for m in re.finditer(instruction, hlo_text, re.M):
        name, _, rest = m.groups()
        called = re.search(r"calls=%([\w.\-]+)", rest)
        classes[name] = op_class(bodies.get(called.group(1), "") if called else m.group(0))
    return classes


def op_class(body: str) -> str:
    """The class of one fused computation's body (or one instruction)."""
    ops = set(re.findall(r"= \S+ (\w[\w-]*)\(", body))
    if "convolution" in ops:
        window = re.search(r"window=\{size=(\d+)x(\d+)", body)
        small = window is None or max(int(window.group(1)), int(window.group(2))) <= 3
        return CLASSES[0] if small else CLASSES[1]
    if "transpose" in ops:
        return CLASSES[2]
    if "dot" in ops:
        return CLASSES[4]
    if "reduce" in ops:
        return CLASSES[3]
    return CLASSES[5]


def xla_split(loss_grad, args, calls: int) -> dict[str, float]:
    """{class: ms per call} of loss_grad(*args) (jitted), from a jax.profiler trace."""
    classes = hlo_classes(loss_grad.lower(*args).compile().as_text())
    jax.block_until_ready(loss_grad(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                jax.block_until_ready(loss_grad(*args))
        path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(path)
        split = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                if "XLA" not in line.name:  # XLA's executor threads
                    continue
                for event in line.events:
                    if event.name in classes:
                        split[classes[event.name]] += event.duration_ns / 1e6 / calls
    return split


def torch_split(loss_backward, calls: int) -> dict[str, float]:
    """{ATen operator: self CPU ms per call} of loss_backward()."""
    from torch.profiler import ProfilerActivity, profile
    loss_backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            loss_backward()
    return {e.key: e.self_cpu_time_total / 1e3 / calls for e in prof.key_averages()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edm", required=True, help="a local checkout of NVlabs/edm")
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args()
    import torch._dynamo  # noqa: F401  before JAX's backend (as in speed.py)
    import torch
    sys.path[:0] = [args.edm, os.path.dirname(os.path.abspath(__file__))]
    import speed
    from training.loss import EDMLoss

    from difflax.training import get_edm_loss_fn
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    den, params, build, weights = speed.edm_pair("digits", False, args.edm)
    x, _, labels = speed.edm_inputs(den, speed.BATCH["digits"])
    batch = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(labels.argmax(-1)))
    loss_grad = jax.jit(jax.value_and_grad(get_edm_loss_fn(den)))
    xla = xla_split(loss_grad, (params, batch, jax.random.key(0)), args.calls)
    print(f"difflax (XLA), ms per loss + gradient, {args.calls} calls: "
          f"total {sum(xla.values()):.0f}")
    for name in CLASSES:
        print(f"  {xla[name]:7.1f}  {name}")
    net = build().train()
    net.load_state_dict(weights)
    tx, tl, loss_fn = torch.from_numpy(x), torch.from_numpy(labels), EDMLoss()

    def loss_backward():
        net.zero_grad(set_to_none=True)
        (loss_fn(net, tx, tl).sum() / len(x)).backward()

    ops = torch_split(loss_backward, args.calls)
    print(f"PyTorch, self CPU ms per loss + backward: total {sum(ops.values()):.0f}")
    for name, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {ms:7.1f}  {name}")


if __name__ == "__main__":
    main()
