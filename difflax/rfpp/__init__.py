"""rfpp: Lee, Lin & Fanti, "Improving the Training of Rectified Flows" (NeurIPS 2024).

The paper, section by section, and where it is here:

| paper | code |
| --- | --- |
| Sec. 2, eq. 1-3: the linear path x_t = (1 - t) x + t z and the flow-matching loss with a premetric m | `loss.linear_path`, `loss.rectified_flow_loss`, `get_rectified_flow_loss_fn` |
| Sec. 2 and 4: Reflow, (noise, sample) pairs from the teacher's probability-flow ODE (Liu et al. 2023, Sec. 2.3) | `reflow.generate_pairs`, `load_pairs`, `pair_batches`, `get_teacher_sample_fn` |
| Sec. 3.1: the U-shaped time distribution (and uniform, logit-normal) | `time_distribution.TimeDistribution` |
| the premetrics: pseudo-Huber (c as rfpp's `train.py`, or iCT's), LPIPS-Huber (eq. 8) | `loss.pseudo_huber`, `huber_constant`, premetric "lpips_huber" |
| Sec. 4: initialising the 2-rectified flow from the teacher's EDM denoiser | `loss.velocity_from_denoiser` |
| 1-2 NFE sampling on rfpp's grid (`generate.py --t_steps`), its re-noising sampler (`--sampler new`) | `few_step.rf_schedule`, `rf_grid`, `reflow.get_rectified_flow_sample_fn`; the update rules `rf_euler`, `rf_heun`, `rf_renoise` are samplers (`difflax.samplers.flow`) |
| straightness of the flow (Liu et al. 2023, Def. 2.4; rfpp `utils.straightness`) | `few_step.straightness` |

The samplers are built with the one sampling factory, `difflax.samplers.get_sample_fn`; the
2-rectified flow trains with `difflax.training.train` on `get_rectified_flow_loss_fn`.
"""
from difflax.rfpp.few_step import T_MAX, rf_grid, rf_schedule, straightness
from difflax.rfpp.loss import (PREMETRICS, get_rectified_flow_loss_fn, huber_constant,
                               linear_path, pseudo_huber, rectified_flow_loss, rms_l2, squared_l2,
                               velocity_from_denoiser)
from difflax.rfpp.reflow import (generate_pairs, get_rectified_flow_sample_fn,
                                 get_teacher_sample_fn, load_pairs, pair_batches)
from difflax.rfpp.time_distribution import TIME_DISTRIBUTIONS, TimeDistribution

__all__ = [
    "PREMETRICS", "T_MAX", "TIME_DISTRIBUTIONS", "TimeDistribution", "generate_pairs",
    "get_rectified_flow_loss_fn", "get_rectified_flow_sample_fn", "get_teacher_sample_fn",
    "huber_constant", "linear_path", "load_pairs", "pair_batches", "pseudo_huber",
    "rectified_flow_loss", "rf_grid", "rf_schedule", "rms_l2", "squared_l2", "straightness",
    "velocity_from_denoiser",
]
