"""Speed against the PyTorch references, on one machine, same networks, weights and inputs.

Networks (README, "Speed"):
  - digits: the default job's DDPM++ (configs/digits_edm.py, 16x16x1, class-conditional);
  - cifar:  EDM's CIFAR-10 DDPM++ (configs/cifar10_ddpmpp.py, 55.7M parameters);
  - sd:     Stable Diffusion 1.5's UNet (860M parameters, random weights) at 32x32x4 latents,
            against diffusers' `UNet2DConditionModel`;
  - ops:    the CIFAR network's 3x3 convolution and GroupNorm alone (forward + backward),
            also in XLA with PyTorch's NCHW layout and with XLA's own NHWC derivatives
            (difflax's `layers.conv2d` writes the weight derivative as matrix products), and
            GroupNorm with XLA's derivative of the plain formula (`layers.group_norm` writes
            it out): where the CPU time goes; the convolution also forward only, and forward
            + the input's or the weight's gradient alone.
The EDM networks' reference is EDM's own PyTorch code (`training/networks.py` EDMPrecond,
`training/loss.py` EDMLoss, `generate.py` edm_sampler). It is under its own licence and does
not ship with difflax: `--edm` names a local checkout of https://github.com/NVlabs/edm.
Random PyTorch weights are converted to difflax (`difflax.models.convert_state_dict`,
`convert_sd_unet_state_dict`), and the outputs of the two forwards are compared first.

What is timed, per network (candidates in interleaved rounds, `difflax.timing`; the ratio
difflax / PyTorch is taken per round and its median and interquartile range reported):
  - forward: one network call (difflax jitted; PyTorch eager under no_grad, and
    `torch.compile` with --compile);
  - train step: EDM's loss, backward, Adam and the EMA update (difflax's jitted training step
    of `difflax train`; EDM's training loop's step; and difflax's step with XLA's own
    derivatives of the convolution, as before `layers.conv2d`, and with --split of
    GroupNorm, as before `layers.group_norm`). Not for sd. With --split also its pieces: the
    loss's forward + backward (also with XLA's GroupNorm derivative), and Adam + EMA given
    the gradients;
  - sampling: EDM's Heun sampler with 18 steps (35 NFE) (difflax `edm_heun`; EDM's
    `edm_sampler`); for sd, DDIM with classifier-free guidance (difflax's plan sampler as the
    SD pipeline runs it; diffusers' DDIMScheduler loop);
  - peak memory: each (framework, network, what) in a fresh process, the growth of its peak
    resident set over one call after set-up and compilation (Linux /proc); not for sampling,
    whose peak is a forward's.
Sampling runs at batch 4 for cifar (35 NFE at 16 take minutes per round) and for
--sampling-rounds rounds.
Prints the device and the table, writes OUT/table.md and OUT/results.json.

    python experiments/speed.py --edm PATH/TO/edm [--nets digits cifar sd ops] [--rounds 5]
        [--compile] [--no-memory] [--split] [--out experiments/results/speed]
    python experiments/speed.py --edm PATH/TO/edm --small     # tiny networks: checks the code
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from difflax import configs
from difflax.mesh import make_mesh
from difflax.timing import interleaved_times, ratio_summary

NETS = ("digits", "cifar", "sd", "ops")
WHATS = ("forward", "train step", "sampling")
CONFIGS = {"digits": "configs/digits_edm.py", "cifar": "configs/cifar10_ddpmpp.py"}
BATCH = {"digits": 64, "cifar": 16, "sd": 1, "ops": 16}
SAMPLING_BATCH = {"digits": 64, "cifar": 4, "sd": 1}  # CIFAR: 35 NFE at batch 16 take minutes


def edm_pair(net_name, small, edm_dir):
    """(difflax Denoiser, its params, build() -> EDM's PyTorch EDMPrecond, the state_dict
    both share)."""
    import torch
    from training.networks import EDMPrecond  # EDM's, on sys.path (candidates)

    from difflax.models import convert_state_dict
    config = configs.load_config(CONFIGS[net_name] + (":smoke" if small else ""))
    den = configs.denoiser_from_config(config)
    u = den.net
    skip = {"model_type", "img_resolution", "in_channels", "out_channels", "label_dim",
            "surgery", "remat"}
    kwargs = {k: list(getattr(u, k)) if isinstance(getattr(u, k), tuple) else getattr(u, k)
              for k in u.__dataclass_fields__ if k not in skip}
    build = lambda: EDMPrecond(u.img_resolution, u.in_channels, u.label_dim,  # noqa: E731
                               model_type=u.model_type, sigma_data=den.sigma_data, **kwargs)
    torch.manual_seed(0)
    ref = build()
    with torch.no_grad():  # off the zero-initialised output layers, so outputs differ by input
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = ref.state_dict()
    return den, convert_state_dict(state, den)["params"], build, state


def lax_conv2d(x, w, padding):
    """`layers.conv2d` with XLA's own derivatives (before it wrote the weight derivative as
    matrix products)."""
    return jax.lax.conv_general_dilated(x, w, (1, 1), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def plain_group_norm(x, weight, bias, groups, eps):
    """`layers.group_norm` as the plain formula, differentiated by XLA (before its derivative
    was written out)."""
    y = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    axes = tuple(range(1, y.ndim - 2)) + (y.ndim - 1,)
    mean = y.mean(axes, keepdims=True)
    var = jnp.square(y - mean).mean(axes, keepdims=True)
    return ((y - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * weight + bias


@contextlib.contextmanager
def layers_replaced(**fns):
    """Within it, difflax's layers call fns[name] in place of `layers.<name>` (e.g.
    conv2d=lax_conv2d): what a jitted function first called here compiles stays so."""
    from difflax.models import layers
    saved = {name: getattr(layers, name) for name in fns}
    for name, fn in fns.items():
        setattr(layers, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(layers, name, fn)


def edm_inputs(den, batch, seed=0):
    rng = np.random.default_rng(seed)
    u = den.net
    x = rng.normal(size=(batch, u.in_channels, u.img_resolution, u.img_resolution))
    sigma = np.exp(rng.normal(-1.2, 1.2, size=batch))
    labels = np.eye(max(u.label_dim, 1))[rng.integers(0, max(u.label_dim, 1), batch)]
    return x.astype(np.float32), sigma.astype(np.float32), labels.astype(np.float32)


TRAIN = dict(lr=1e-3, warmup_steps=1, ema_halflife_kimg=500.0)  # both frameworks' settings


def difflax_step(den, params, batch_j, **replaced):
    """A zero-argument fn: one step of difflax's jitted training step (`get_train_step_fn`,
    EDM loss, Adam, EMA) on its own state, compiled here with `layers_replaced(**replaced)`."""
    from difflax.training import (TrainConfig, ema_decay, get_edm_loss_fn, get_train_step_fn,
                                  init_train_state, make_optimizer)
    cfg = TrainConfig(batch_size=batch_j[0].shape[0], **TRAIN)
    tx, mesh = make_optimizer(cfg), make_mesh()
    state = {"s": init_train_state(lambda: jax.tree.map(jnp.copy, params), tx, mesh)}
    step_fn = get_train_step_fn(get_edm_loss_fn(den), tx, lambda s: ema_decay(cfg, s), mesh)
    key = jax.random.key(0)

    def step():
        state["s"], metrics = step_fn(state["s"], batch_j, key)
        return metrics["loss"]

    with layers_replaced(**replaced):
        jax.block_until_ready(step())
    return step


def difflax_loss_grad(den, params, batch_j, **replaced):
    """A zero-argument fn: the EDM loss and its gradient (the step's forward + backward),
    jitted and compiled here with `layers_replaced(**replaced)`."""
    from difflax.training import get_edm_loss_fn
    loss_grad = jax.jit(jax.value_and_grad(get_edm_loss_fn(den)))
    key = jax.random.key(0)
    with layers_replaced(**replaced):
        jax.block_until_ready(loss_grad(params, batch_j, key))
    return lambda: loss_grad(params, batch_j, key)


def difflax_update(den, params, batch_j):
    """A zero-argument fn: the step's update given the gradients (Adam, then the EMA, as
    `get_train_step_fn` does it), jitted, its state donated."""
    import optax

    from difflax.training import TrainConfig, ema_decay, ema_update, get_edm_loss_fn, make_optimizer
    cfg = TrainConfig(batch_size=batch_j[0].shape[0], **TRAIN)
    tx = make_optimizer(cfg)
    grads = jax.grad(get_edm_loss_fn(den))(params, batch_j, jax.random.key(0))

    def update(params, opt_state, ema, step):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, ema_update(ema, params, ema_decay(cfg, step))

    update = jax.jit(update, donate_argnums=(0, 1, 2))
    copy = lambda: jax.tree.map(jnp.copy, params)  # noqa: E731
    state = {"s": (copy(), tx.init(params), copy())}

    def fn():
        state["s"] = update(*state["s"], jnp.int32(1))
        return state["s"][0]

    return fn


def torch_train_fns(build, weights, tx_, tl_, batch):
    """{"train step", "loss fwd+bwd", "Adam + EMA": zero-argument fn}: EDM's training-loop
    step (EDMLoss, backward, Adam, EMA), and its two halves on a second copy of the network
    (the update uses the gradients the last backward left)."""
    import torch
    from training.loss import EDMLoss
    loss_fn, decay = EDMLoss(), 0.5 ** (batch / (TRAIN["ema_halflife_kimg"] * 1e3))

    def pieces():
        net = build().train()
        net.load_state_dict(weights)
        ema = {k: v.clone() for k, v in net.state_dict().items()}
        opt = torch.optim.Adam(net.parameters(), lr=TRAIN["lr"], betas=(0.9, 0.999), eps=1e-8)

        def loss_backward():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net, tx_, tl_).sum() / batch
            loss.backward()
            return loss

        def update():
            for p in net.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            opt.step()
            with torch.no_grad():
                for k, v in net.state_dict().items():
                    ema[k].copy_(v.detach().lerp(ema[k], decay))

        return loss_backward, update

    step_loss, step_update = pieces()
    loss_backward, update = pieces()
    loss_backward()

    def step():
        loss = step_loss()
        step_update()
        return loss

    return {"train step": step, "loss fwd+bwd": loss_backward, "Adam + EMA": update}


def edm_candidates(net_name, small, edm_dir, batch, compile_torch, split):
    """{what: {framework: zero-argument fn}} and the forward outputs' max abs difference."""
    import torch
    import generate as edm_generate

    from difflax.workdir import get_sample_fn
    den, params, build, weights = edm_pair(net_name, small, edm_dir)
    ref = build().eval()
    ref.load_state_dict(weights)
    x, sigma, labels = edm_inputs(den, batch)
    label_dim = den.net.label_dim
    tx_, ts_, tl_ = (torch.from_numpy(a) for a in (x, sigma, labels))
    tl_ = tl_ if label_dim else None
    jx, js = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(sigma)
    jl = jnp.asarray(labels) if label_dim else None
    forward = jax.jit(lambda p, x, s, l: den.apply({"params": p}, x, s, l))
    with torch.no_grad():
        diff = np.abs(ref(tx_, ts_, tl_).numpy().transpose(0, 2, 3, 1)
                      - np.asarray(forward(params, jx, js, jl))).max()

    def torch_forward(module):
        def fn():
            with torch.no_grad():
                return module(tx_, ts_, tl_)
        return fn

    out = {"forward": {"difflax": lambda: forward(params, jx, js, jl),
                       "PyTorch": torch_forward(ref)}}
    if compile_torch:
        out["forward"]["torch.compile"] = torch_forward(torch.compile(ref))

    # train step: difflax's jitted step of `difflax train` vs EDM's training-loop step; the
    # same step traced with XLA's own derivatives of the convolution / GroupNorm (before)
    ints = jnp.asarray(labels.argmax(-1)) if label_dim else None
    batch_j = (jx, ints)
    torch_fns = torch_train_fns(build, weights, tx_, tl_, batch)
    out["train step"] = {
        "difflax": difflax_step(den, params, batch_j),
        "PyTorch": torch_fns["train step"],
        "XLA conv derivatives": difflax_step(den, params, batch_j, conv2d=lax_conv2d)}
    if split:  # GroupNorm's derivative before; the step's pieces: the loss's forward +
        # backward, then Adam and the EMA given the gradients
        out["train step"]["XLA GroupNorm derivative"] = difflax_step(
            den, params, batch_j, group_norm=plain_group_norm)
        out["loss fwd+bwd"] = {
            "difflax": difflax_loss_grad(den, params, batch_j),
            "PyTorch": torch_fns["loss fwd+bwd"],
            "XLA GroupNorm derivative": difflax_loss_grad(den, params, batch_j,
                                                          group_norm=plain_group_norm)}
        out["Adam + EMA"] = {"difflax": difflax_update(den, params, batch_j),
                             "PyTorch": torch_fns["Adam + EMA"]}
    sample, _ = get_sample_fn(den, sampler="edm_heun", steps=18, sigma_min=0.002, sigma_max=80.0)
    n = min(batch, SAMPLING_BATCH[net_name])
    ints_np = labels[:n].argmax(-1)
    noise = torch.randn((n, *x.shape[1:]), generator=torch.Generator().manual_seed(1))

    def torch_sample():
        with torch.no_grad():
            return edm_generate.edm_sampler(ref, noise, None if tl_ is None else tl_[:n],
                                            num_steps=18)

    out["sampling"] = {"difflax": lambda: sample(params, jax.random.key(1), ints_np),
                       "PyTorch": torch_sample}
    return out, float(diff)


SD_TINY = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
               attention_head_dim=2, norm_num_groups=8)
SD15 = dict(sample_size=32, cross_attention_dim=768)  # diffusers' defaults are SD 1.5's UNet


def sd_candidates(small, batch, steps, compile_torch):
    """As edm_candidates, for SD 1.5's UNet against diffusers' (guidance 7.5, DDIM)."""
    import diffusers
    import torch

    from difflax.models.sd_unet import SDUNet, sd_run_fn
    from difflax.models.sd_unet_weights import (convert_sd_unet_state_dict,
                                                sd_unet_config_from_diffusers)
    from difflax.pipelines import SDScheduler
    from difflax.samplers import full_plan, sample_with_plan
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**(SD_TINY if small else SD15)).eval()
    config = sd_unet_config_from_diffusers(  # diffusers keeps an in-memory-only key
        {k: v for k, v in ref.config.items() if k != "_use_default_values"})
    unet = SDUNet(config)
    variables = convert_sd_unet_state_dict(
        {k: v.numpy() for k, v in ref.state_dict().items()}, config)
    rng = np.random.default_rng(0)
    size, dim = ref.config.sample_size, ref.config.cross_attention_dim
    x = rng.normal(size=(batch, 4, size, size)).astype(np.float32)
    context = rng.normal(size=(2 * batch, 77, dim)).astype(np.float32)
    tx_, tc_ = torch.from_numpy(x), torch.from_numpy(context)
    jx, jc = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(context)
    x2, t2 = jnp.concatenate([jx, jx]), jnp.full((2 * batch,), 500.0)
    forward = jax.jit(lambda v, x, t, c: unet.apply(v, x, t, c))
    with torch.no_grad():
        ref_out = ref(torch.cat([tx_, tx_]), 500, encoder_hidden_states=tc_).sample
    diff = np.abs(ref_out.numpy().transpose(0, 2, 3, 1)
                  - np.asarray(forward(variables, x2, t2, jc))).max()

    def torch_forward(module):
        def fn():
            with torch.no_grad():
                return module(torch.cat([tx_, tx_]), 500, encoder_hidden_states=tc_).sample
        return fn

    out = {"forward": {"difflax": lambda: forward(variables, x2, t2, jc),
                       "PyTorch": torch_forward(ref)}}
    if compile_torch:
        out["forward"]["torch.compile"] = torch_forward(torch.compile(ref))
    scheduler = SDScheduler()
    schedule, grid = scheduler.schedule(), scheduler.grid(steps, "ddim")
    sample = jax.jit(lambda v, x: sample_with_plan(
        sd_run_fn(unet, v, jc, guidance_scale=7.5), x, plan=full_plan(steps), config=config,
        schedule=schedule, sampler="ddim", grid=grid, prediction="eps")[0])
    ddim = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", clip_sample=False,
                                   set_alpha_to_one=False, steps_offset=1)

    def torch_sample():
        ddim.set_timesteps(steps)
        latents = tx_.clone()
        with torch.no_grad():
            for t in ddim.timesteps:
                eps_u, eps_c = ref(torch.cat([latents] * 2), t,
                                   encoder_hidden_states=tc_).sample.chunk(2)
                latents = ddim.step(eps_u + 7.5 * (eps_c - eps_u), t, latents).prev_sample
        return latents

    out["sampling"] = {"difflax": lambda: sample(variables, jx), "PyTorch": torch_sample}
    return out, float(diff)


def op_candidates(small):
    """The CIFAR DDPM++'s heaviest operations alone, batch 16 (4 with --small), forward and
    backward: difflax's layers (NHWC), the same in XLA with NCHW, PyTorch (NCHW)."""
    import torch
    import torch.nn.functional as F

    from difflax.models.layers import Conv2d, GroupNorm
    b, c, r = (4, 32, 16) if small else (16, 256, 32)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, c, r, r)).astype(np.float32)
    w = (rng.normal(size=(c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    tx_, tw_ = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    jx, jw = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(w.transpose(2, 3, 1, 0))
    conv = Conv2d(c, 3, use_bias=False)
    norm = GroupNorm()
    norm_vars = norm.init(jax.random.key(0), jx)

    def nchw_conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2,
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"))

    def nhwc_conv(x, w):  # XLA's own derivatives, not `layers.conv2d`'s weight derivative
        return jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def grad_of(f, *args, wrt=None):  # the gradient of sum(f ** 2) w.r.t. args[wrt] (all)
        wrt = tuple(range(len(args))) if wrt is None else wrt
        g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=wrt))
        return lambda: g(*args)

    def torch_grad(f, *args, wrt=None):  # autograd computes only the gradients asked for
        wrt = range(len(args)) if wrt is None else wrt
        return lambda: torch.autograd.grad((f(*args) ** 2).sum(), [args[i] for i in wrt])

    def torch_forward(f, *args):
        def fn():
            with torch.no_grad():
                return f(*args)
        return fn

    jxc, jwc = jnp.asarray(x), jnp.asarray(w)
    tn = torch.nn.GroupNorm(32, c)
    with torch.no_grad():
        diff = np.abs(F.conv2d(tx_, tw_, padding=1).numpy().transpose(0, 2, 3, 1)
                      - np.asarray(conv.apply({"params": {"weight": jw}}, jx))).max()
    apply_conv = jax.jit(lambda x, w: conv.apply({"params": {"weight": w}}, x))
    torch_conv = lambda x, w: F.conv2d(x, w, padding=1)  # noqa: E731
    return {
        "conv3x3 fwd+bwd": {
            "difflax": grad_of(apply_conv, jx, jw),
            "PyTorch": torch_grad(torch_conv, tx_, tw_),
            "XLA NCHW": grad_of(nchw_conv, jxc, jwc),
            "XLA NHWC": grad_of(nhwc_conv, jx, jw)},
        # which half of the backward pass XLA loses on (each includes the forward)
        "conv3x3 forward": {
            "difflax": lambda: apply_conv(jx, jw),
            "PyTorch": torch_forward(torch_conv, tx_, tw_),
            "XLA NCHW": lambda f=jax.jit(nchw_conv): f(jxc, jwc)},
        "conv3x3 fwd + input grad": {
            "difflax": grad_of(apply_conv, jx, jw, wrt=(0,)),
            "PyTorch": torch_grad(torch_conv, tx_, tw_, wrt=(0,)),
            "XLA NCHW": grad_of(nchw_conv, jxc, jwc, wrt=(0,))},
        "conv3x3 fwd + weight grad": {
            "difflax": grad_of(apply_conv, jx, jw, wrt=(1,)),
            "PyTorch": torch_grad(torch_conv, tx_, tw_, wrt=(1,)),
            "XLA NCHW": grad_of(nchw_conv, jxc, jwc, wrt=(1,)),
            "XLA NHWC": grad_of(nhwc_conv, jx, jw, wrt=(1,))},
        "GroupNorm fwd+bwd": {
            "difflax": grad_of(lambda x: norm.apply(norm_vars, x), jx),
            "PyTorch": torch_grad(tn, tx_),
            "XLA GroupNorm derivative": grad_of(lambda x: plain_group_norm(
                x, norm_vars["params"]["weight"], norm_vars["params"]["bias"], 32, 1e-5), jx)},
    }, float(diff)


def candidates(args, net):
    if args.edm not in sys.path:
        sys.path.insert(0, args.edm)
    if net == "ops":
        return op_candidates(args.small)
    if net == "sd":
        return sd_candidates(args.small, BATCH[net], args.sd_steps, args.compile)
    return edm_candidates(net, args.small, args.edm, 4 if args.small else BATCH[net],
                          args.compile, args.split)


def resident_mib(field):
    """VmRSS / VmHWM of this process, MiB (Linux)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kib / 1024


def peak_growth(fn):
    """MiB by which one call of fn() (after a warm-up call) raises the resident-set peak."""
    jax.block_until_ready(fn())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    before = resident_mib("VmRSS")
    jax.block_until_ready(fn())
    return resident_mib("VmHWM") - before


def measure_memory(args, net, what, framework):
    """Runs this script again in a fresh process for one candidate; its peak growth, MiB.
    Large blocks are mmap'ed (MALLOC_MMAP_THRESHOLD_), so freeing them lowers the RSS and the
    warm-up call leaves no reusable heap behind in either framework."""
    cmd = [sys.executable, __file__, "--memory-of", net, what, framework, "--edm", args.edm,
           "--sd-steps", str(args.sd_steps)] + (["--small"] if args.small else []) + (
               ["--split"] if args.split else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def run(args):
    import torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"
    print(f"jax {jax.__version__} on {device}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = []
    for net in args.nets:
        fns, diff = candidates(args, net)
        print(f"{net}: max |difflax - PyTorch| forward = {diff:.2e}", flush=True)
        for what, frameworks in fns.items():
            tic = time.perf_counter()
            rounds = args.sampling_rounds if what == "sampling" else args.rounds
            timings = interleaved_times(frameworks, rounds)
            ratio = ratio_summary(timings["difflax"].wall / timings["PyTorch"].wall)
            batch = 4 if args.small and net != "sd" else BATCH[net]
            if what == "sampling":
                batch = min(batch, SAMPLING_BATCH[net])
            row = dict(net=net, what=what, batch=batch, max_abs_diff=diff, ratio=ratio,
                       rounds=rounds, seconds={k: float(np.median(t.wall))
                                               for k, t in timings.items()})
            if not args.no_memory and what != "sampling":  # sampling's peak: a forward's
                row["peak_mib"] = {fw: measure_memory(args, net, what, fw)
                                   for fw in ("difflax", "PyTorch")}
            rows.append(row)
            print(f"  {what}: difflax/PyTorch {ratio[0]:.2f} "
                  f"({time.perf_counter() - tic:.0f} s)", flush=True)
        del fns
    write(args.out, dict(device=device, jax=jax.__version__, torch=torch.__version__,
                         threads=torch.get_num_threads(), small=args.small), rows)


def write(out_dir, env, rows):
    def ms(r, k):
        return f"{r['seconds'][k] * 1e3:.0f}" if k in r["seconds"] else "-"

    def others(r):  # torch.compile, XLA with another layout or its own conv derivatives
        return ", ".join(f"{k} {ms(r, k)}" for k in r["seconds"]
                         if k not in ("difflax", "PyTorch")) or "-"

    lines = [f"Speed: jax {env['jax']} on {env['device']}; torch {env['torch']}, "
             f"{env['threads']} threads. Median wall ms over interleaved rounds; "
             "difflax / PyTorch: median [IQR] of per-round ratios.", "",
             "| network (batch) | what | difflax ms | PyTorch ms | other ms "
             "| difflax / PyTorch | peak MiB difflax / PyTorch |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m, lo, hi = r["ratio"]
        mem = r.get("peak_mib")
        lines.append(f"| {r['net']} ({r['batch']}, {r['rounds']} rounds) | {r['what']} | {ms(r, 'difflax')} | "
                     f"{ms(r, 'PyTorch')} | {others(r)} | {m:.2f} [{lo:.2f}, "
                     f"{hi:.2f}] | " + (f"{mem['difflax']:.0f} / {mem['PyTorch']:.0f}"
                                        if mem else "-") + " |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edm", required=True, help="a local checkout of NVlabs/edm (its "
                   "training/ and generate.py are the reference; not shipped with difflax)")
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sampling-rounds", type=int, default=2)
    p.add_argument("--sd-steps", type=int, default=10, help="DDIM steps of the sd sampling run")
    p.add_argument("--compile", action="store_true", help="also time torch.compile's forward")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--split", action="store_true", help="also time the train step's pieces: "
                   "the loss's forward + backward, and Adam + EMA")
    p.add_argument("--small", action="store_true", help="tiny networks: a quick check")
    p.add_argument("--out", default="experiments/results/speed")
    p.add_argument("--memory-of", nargs=3, metavar=("NET", "WHAT", "FRAMEWORK"),
                   help=argparse.SUPPRESS)  # internal: one candidate's peak memory
    args = p.parse_args()
    import torch._dynamo  # noqa: F401  before JAX's backend: its triton import crashes after it
    if not os.path.exists(os.path.join(args.edm, "training", "networks.py")):
        p.error(f"--edm {args.edm}: not a checkout of NVlabs/edm (no training/networks.py)")
    if args.memory_of:
        net, what, framework = args.memory_of
        fns, _ = candidates(args, net)
        print(peak_growth(fns[what][framework]))
        return
    run(args)


if __name__ == "__main__":
    main()
