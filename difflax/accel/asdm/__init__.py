"""A-SDM: model assembly, feature inheritance and redundancy removal, mapped to the code.

Zhu et al., [I] "A-SDM: Accelerating Stable Diffusion through Model Assembly and Feature
Inheritance Strategies" (2024), and [II] "A-SDM: Accelerating Stable Diffusion through
Redundancy Removal and Performance Optimization" (2023). Neither paper has public code: where
the text leaves a choice open, the module docstrings say which one is taken here.

Paper (section) -> code:

- [II] Sec. 3, block pruning (a block's residual branch removed, its shortcut kept;
  attention units removed): `surgery.student(teacher, drop_blocks=, drop_attention=)`,
  filling the UNet's generic `difflax.models.Surgery` (an EDM denoiser's or Stable
  Diffusion's `SDUNet`); the student initialised from the teacher by name:
  `surgery.inherit_params`; parameter and FLOP counts: `count_params`,
  `denoiser_flops`.
- [I] Sec. 3, ME-CondConv (a pruned branch replaced by a multi-expert conditional
  convolution): `condconv.CondConv2d`, as a branch `condconv.CondConvBranch`
  (`student(condconv_experts=K)`).
- [II] Sec. 3, CLME-CondConv (experts initialised from the removed layers' kernels, across
  layers): `condconv.clme_experts`, applied by `inherit_params(..., clme=True)`.
- [II] Sec. 3, GRI attention (regional windowed + global pooled attention):
  `gri.gri_attention`, its layout `gri.GRIConfig` (`student(attention="gri", gri_window=,
  gri_pool=, gri_combine=)`).
- [I] Sec. 3.3, multi-UNet switching (the full model early, the light one late):
  `switching.switch_sigma`, `switching.MultiUNetDenoiser`, `switching.get_multi_unet_fn`.
- [I] Sec. 3, feature inheritance (block / layer / unit granularity, time-step modes):
  `inheritance.inheritance_plan`, `inheritance.inheritance_nodes`, plans run by
  `difflax.samplers.sample_with_plan`.
- [I] Sec. 3.1 and [II] Sec. 3, distillation (task + output + block features +
  semantic-aware supervision): `distill.DistillConfig`, `distill.distill_denoiser`,
  `distill.distill_loss`; progressive incubation (pruning in stages): `distill.PruningStage`.
  The loss in the training loop (`get_distill_loss_fn`) and the stage loop
  (`progressive_distill`) train, so they are in `difflax.training.distill`.

The network (difflax.models) knows none of this: a pruned block's replacement and the
attention function are hooks of `UNetBlock` and of SD's `ResnetBlock` / `Attention`
(`branch`, `attend`) that `student` fills with `CondConvBranch` and `GRIConfig`. The training loop is above this layer (models < samplers <
accel < training), so the stage loop and the composition with EDM's task loss sit in
`difflax.training.distill`, which imports this package.
"""
from difflax.accel.asdm.condconv import CondConv2d, CondConvBranch, clme_experts
from difflax.accel.asdm.distill import (DistillConfig, PruningStage, distill_denoiser,
                                        distill_loss, feature_loss)
from difflax.accel.asdm.gri import GRIConfig, gri_attention
from difflax.accel.asdm.inheritance import GRANULARITIES, inheritance_nodes, inheritance_plan
from difflax.accel.asdm.surgery import count_params, denoiser_flops, inherit_params, student
from difflax.accel.asdm.switching import MultiUNetDenoiser, get_multi_unet_fn, switch_sigma

__all__ = [
    "CondConv2d", "CondConvBranch", "DistillConfig", "GRANULARITIES", "GRIConfig",
    "MultiUNetDenoiser", "PruningStage", "clme_experts", "count_params", "denoiser_flops",
    "distill_denoiser", "distill_loss", "feature_loss", "get_multi_unet_fn", "gri_attention",
    "inherit_params", "inheritance_nodes", "inheritance_plan", "student", "switch_sigma",
]
