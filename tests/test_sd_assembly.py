"""A-SDM surgery on Stable Diffusion's UNet (difflax.accel.asdm on difflax.models.SDUNet):
pruned ResNets keep their shortcut, CondConv (CLME) replacements, dropped transformers, GRI
self-attention, inheritance by diffusers' names, and a student in StableDiffusion.generate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflax.accel import asdm
from difflax.models import SDUNet, SDUNetConfig, prunable_blocks
from difflax.models.sd_unet_weights import init_sd_unet

CFG = SDUNetConfig(sample_size=8, block_out_channels=(16, 32), layers_per_block=(1, 1),
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 2),
                   transformer_layers_per_block=(1, 1), norm_num_groups=8)
BLOCKS = ("down_blocks_0.layer_0", "down_blocks_1.layer_0", "mid_block.resnets_0",
          "mid_block.resnets_1", "up_blocks_0.layer_0", "up_blocks_0.layer_1",
          "up_blocks_1.layer_0", "up_blocks_1.layer_1")
RNG = np.random.default_rng(0)
NOISE = jnp.asarray(RNG.normal(size=(2, 8, 8, 4)), jnp.float32)
T = jnp.array([3.0, 801.0])
CONTEXT = jnp.asarray(RNG.normal(size=(2, 5, 12)), jnp.float32)
STORE = ("conv_in", "down_blocks_0.downsampler", "down_blocks_1.layer_0", "mid_block",
         "up_blocks_1.layer_0", "up_blocks_1.layer_1")


@pytest.fixture(scope="module")
def teacher():
    """The tiny UNet with its weights moved off their initial values."""
    variables = init_sd_unet(CFG, jax.random.key(0), 12)
    return SDUNet(CFG), jax.tree.map(
        lambda a: a + jnp.asarray(RNG.normal(size=a.shape) * 0.2, a.dtype), variables)


# (output, {node: value} for STORE): one compilation per UNet, shared
run = jax.jit(lambda unet, v: unet.apply(v, NOISE, T, CONTEXT, store=STORE, method=SDUNet.run),
              static_argnums=0)


def conv(x, layer, pad="SAME"):
    """A flax convolution's layer {"kernel" HWIO, "bias"} applied by hand."""
    y = jax.lax.conv_general_dilated(x, layer["kernel"], (1, 1), pad,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + layer["bias"]


def group_norm(x, layer, groups=8, eps=1e-5):
    b, h, w, c = x.shape
    g = np.asarray(x, np.float64).reshape(b, h, w, groups, c // groups)
    g = (g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(g.var((1, 2, 4), keepdims=True) + eps)
    return g.reshape(x.shape) * np.asarray(layer["scale"]) + np.asarray(layer["bias"])


def test_sd_prunable_blocks_and_errors_name_the_choices(teacher):
    unet, _ = teacher
    assert prunable_blocks(unet) == prunable_blocks(CFG) == BLOCKS
    assert CFG.block_params()["up_blocks_1.layer_0"] == ("up_blocks_1", "resnets_0")
    with pytest.raises(ValueError, match=r"drop_blocks entry 'down_blocks_0.layer_7'; valid "
                                         r"choices: 'down_blocks_0.layer_0', 'down_blocks_1.layer_0', "
                                         r"'mid_block.resnets_0'"):
        asdm.student(unet, drop_blocks=("down_blocks_0.layer_7",))
    with pytest.raises(ValueError, match=r"drop_attention entry 'down_blocks_1.layer_0'; valid "
                                         r"choices: 'down_blocks_0.layer_0', 'mid_block', "
                                         r"'up_blocks_1.layer_0', 'up_blocks_1.layer_1'"):
        asdm.student(unet, drop_attention=("down_blocks_1.layer_0",))
    with pytest.raises(ValueError, match="dropped blocks \\['mid_block'\\] are not blocks"):
        asdm.inherit_params({}, {}, dropped=("mid_block",), model=unet)


def test_sd_student_with_nothing_dropped_is_the_teacher(teacher):
    unet, v = teacher
    student = asdm.student(unet, condconv_experts=2)  # a CondConv hook, but no block pruned
    assert isinstance(student, SDUNet) and student.config.surgery.branch is not None
    shapes = jax.eval_shape(lambda: init_sd_unet(student.config, jax.random.key(1), 12))
    sv, report = asdm.inherit_params(shapes, v, model=student)
    assert not report["new"] and report["inherited"] == len(jax.tree.leaves(v))
    out, nodes = run(student, sv)
    want, want_nodes = run(unet, v)
    np.testing.assert_array_equal(out, want)
    for name in STORE:
        np.testing.assert_array_equal(nodes[name], want_nodes[name])


def test_sd_dropped_blocks_are_their_shortcuts(teacher):
    """A pruned ResNet is its shortcut: the 1x1 conv_shortcut where the channels change (down
    block 1, 16 -> 32; up block 1's last layer on [h, skip]), the identity otherwise (the mid
    block, whose transformer is dropped too: the mid block passes its input on)."""
    unet, v = teacher
    drop = ("down_blocks_1.layer_0", "mid_block.resnets_0", "mid_block.resnets_1",
            "up_blocks_1.layer_1")
    student = asdm.student(unet, drop_blocks=drop, drop_attention=("mid_block", "up_blocks_1.layer_1"))
    shapes = jax.eval_shape(lambda: init_sd_unet(student.config, jax.random.key(1), 12))
    sv, report = asdm.inherit_params(shapes, v, dropped=drop, model=student)
    assert not report["new"] and report["inherited"] == len(jax.tree.leaves(sv))
    p, t = sv["params"], v["params"]
    assert set(p["down_blocks_1"]["resnets_0"]) == {"conv_shortcut"}
    assert "mid_block" not in p  # identity shortcuts, no transformer: no parameters left
    assert set(p["up_blocks_1"]) == {"resnets_0", "resnets_1", "attentions_0"}
    assert asdm.count_params(sv) < asdm.count_params(v)

    out, nodes = run(student, sv)
    want, want_nodes = run(unet, v)
    np.testing.assert_allclose(nodes["down_blocks_0.downsampler"],
                               want_nodes["down_blocks_0.downsampler"], rtol=1e-5, atol=1e-5)
    shortcut = conv(nodes["down_blocks_0.downsampler"], t["down_blocks_1"]["resnets_0"]["conv_shortcut"])
    np.testing.assert_allclose(nodes["down_blocks_1.layer_0"], shortcut, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(nodes["mid_block"], nodes["down_blocks_1.layer_0"])
    concat = jnp.concatenate([nodes["up_blocks_1.layer_0"], nodes["conv_in"]], -1)
    shortcut = conv(concat, t["up_blocks_1"]["resnets_1"]["conv_shortcut"])
    np.testing.assert_allclose(nodes["up_blocks_1.layer_1"], shortcut, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.abs(out - want).max()) > 1e-2


def test_sd_clme_student_takes_removed_kernels(teacher):
    """CLME-CondConv on SD: each CondConv's experts are its own removed kernels (conv1, conv2
    where the shape fits), then the other removed blocks', nearest first, cycling; at
    initialisation (mixing weights 1 / K) a block whose experts are all its conv1 is
    shortcut(x) + conv1(silu(norm1(x)))."""
    unet, v = teacher
    drop = ("down_blocks_0.layer_0", "down_blocks_1.layer_0", "mid_block.resnets_0",
            "mid_block.resnets_1", "up_blocks_0.layer_0")
    student = asdm.student(unet, drop_blocks=drop, condconv_experts=3)
    init = init_sd_unet(student.config, jax.random.key(1), 12)
    sv, report = asdm.inherit_params(init, v, dropped=drop, model=student)
    assert report["clme"] == {"down_blocks_0/resnets_0": 2, "down_blocks_1/resnets_0": 1,
                              "mid_block/resnets_0": 3, "mid_block/resnets_1": 3,
                              "up_blocks_0/resnets_0": 1}
    assert report["new"] and all(path.split("/")[-1].startswith("route") for path in report["new"])
    p, t = sv["params"], v["params"]
    kernel = lambda block, k, layer: t[block][f"resnets_{k}"][layer]["kernel"]
    experts = lambda block, k: p[block][f"resnets_{k}"]["condconv"]["experts"]
    for got, want in ((experts("down_blocks_0", 0), [kernel("down_blocks_0", 0, "conv1"),
                                                     kernel("down_blocks_0", 0, "conv2"),
                                                     kernel("down_blocks_0", 0, "conv1")]),
                      # 32 -> 32: then down block 1's conv2 (distance 1, before mid resnet 1)
                      (experts("mid_block", 0), [kernel("mid_block", 0, "conv1"),
                                                 kernel("mid_block", 0, "conv2"),
                                                 kernel("down_blocks_1", 0, "conv2")]),
                      (experts("mid_block", 1), [kernel("mid_block", 1, "conv1"),
                                                 kernel("mid_block", 1, "conv2"),
                                                 kernel("mid_block", 0, "conv1")]),
                      (experts("up_blocks_0", 0), [kernel("up_blocks_0", 0, "conv1")] * 3)):
        np.testing.assert_array_equal(got, np.stack(want))
    bias = p["down_blocks_1"]["resnets_0"]["condconv"]["bias"]
    np.testing.assert_array_equal(bias, np.stack([t["down_blocks_1"]["resnets_0"]["conv1"]["bias"]] * 3))
    assert set(p["down_blocks_1"]["resnets_0"]) == {"conv_shortcut", "norm1", "condconv"}

    out, nodes = run(student, sv)
    h = nodes["down_blocks_0.downsampler"]
    block = t["down_blocks_1"]["resnets_0"]
    branch = jax.nn.silu(jnp.asarray(group_norm(h, block["norm1"]), jnp.float32))
    np.testing.assert_allclose(nodes["down_blocks_1.layer_0"],
                               conv(h, block["conv_shortcut"]) + conv(branch, block["conv1"]),
                               rtol=1e-4, atol=1e-4)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_sd_gri_with_one_region_and_no_pooling_is_full_attention(teacher):
    unet, v = teacher
    gri = asdm.student(unet, attention="gri", gri_window=0, gri_pool=1)
    np.testing.assert_allclose(run(gri, v)[0], run(unet, v)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="GRI window 3 .* valid choices: 0 or \\[1, 2, 4\\]"):
        asdm.student(unet, attention="gri", gri_window=3, drop_attention=("down_blocks_0.layer_0",
                                                                           "up_blocks_1.layer_0",
                                                                           "up_blocks_1.layer_1"))


def test_sd_student_runs_in_generate(tmp_path):
    """A pruned CLME student of a tiny random SD folder's UNet in StableDiffusion.generate
    (`with_unet`): images of the teacher's shape, different from the teacher's."""
    pytest.importorskip("diffusers")
    from difflax.pipelines import StableDiffusion
    from sd_folders import save_tiny_pipeline

    save_tiny_pipeline(tmp_path, "epsilon")
    sd = StableDiffusion.from_pretrained(tmp_path)
    drop = ("down_blocks_1.layer_0", "up_blocks_1.layer_1")
    student = asdm.student(sd.unet, drop_blocks=drop, drop_attention=("mid_block",),
                           condconv_experts=2)
    init = init_sd_unet(student.config, jax.random.key(1), 32)
    sv, report = asdm.inherit_params(init, sd.unet_vars, dropped=drop, model=student)
    assert report["clme"] == {"down_blocks_1/resnets_0": 1, "up_blocks_1/resnets_1": 1}
    latents = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    prompts = ["hello world", "and hello"]
    plain = sd.generate(prompts, latents=latents, steps=2)
    images = sd.with_unet(student, sv).generate(prompts, latents=latents, steps=2)
    assert images.shape == plain.shape == (2, 16, 16, 3)
    assert bool(np.all(np.isfinite(images))) and np.abs(images - plain).max() > 1e-3
