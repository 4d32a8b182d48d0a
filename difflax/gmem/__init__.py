"""GMem: Tang et al. 2024, "Generative Modeling with Explicit Memory" (code LINs-lab/GMem).

A generator (SiT) is conditioned on a snippet of an explicit memory bank, the L2-normalised
encoder features of its training images, in place of (or with) the class label; it trains much
faster than the label-conditioned SiT. Where each part of the paper is:

| paper | code |
| --- | --- |
| Sec. 3: the memory bank, one unit snippet f_i = E(x_i) / norm per training image (`construct_memory_bank.py`) | `bank.MemoryBank`, `build_memory_bank`, `save_memory_bank`, `load_memory_bank`, `shard_memory_bank` |
| the bank's compression: SVD (`utils/svd_utils.py`); k-means is difflax's addition | `bank.svd_compress`, `bank.kmeans_compress` |
| Sec. 3: SiT conditioned on the snippet (a linear projection added to the time embedding, element-wise snippet dropout, the zero snippet as guidance's null) | `difflax.models.SiT` (`snippet_dim`): generic conditioning, so it stays in the network |
| Sec. 3: training, SiT's interpolant loss with the snippet of each training image | `train.get_batches_fn` (images, labels, snippets) for `difflax.training.train` with `difflax.training.interpolant_loss.get_interpolant_loss_fn` (batches (images, labels, snippets); generic, also SiT's) |
| training with REPA's alignment loss (code: `proj_loss_weight` 0.5, projector after block 4, DINOv2 patch tokens as targets) | `get_batches_fn(..., repa_targets=)` with a SiT's `repa_depth` / `repa_dim` and `get_interpolant_loss_fn(..., repa_weight=)` (`difflax.training.interpolant_loss.repa_loss`) |
| Sec. 3-4: sampling from bank snippets, snippets of new images, interpolated snippets | `sample.get_draw_fn`, `sample.sample_from_bank`, `bank.sample_entries`, `sample_snippets`, `lerp`, `slerp`, `interpolate_snippets` |
| a snippet encoder for the embedded digits (difflax's testbed) | `bank.digits_snippet_encoder` |

GMem sits at the training layer; it is trained by the one loop, `difflax.training.train`.
"""
from difflax.gmem.bank import (SAMPLING, MemoryBank, build_memory_bank, digits_snippet_encoder,
                               interpolate_snippets, kmeans_compress, l2_normalize, lerp,
                               load_memory_bank, sample_entries, sample_snippets,
                               save_memory_bank, shard_memory_bank, slerp, svd_compress)
from difflax.gmem.sample import get_draw_fn, sample_from_bank
from difflax.gmem.train import batch_rows, get_batches_fn

__all__ = [
    "SAMPLING", "MemoryBank", "batch_rows", "build_memory_bank", "digits_snippet_encoder",
    "get_batches_fn",
    "get_draw_fn", "interpolate_snippets", "kmeans_compress", "l2_normalize", "lerp",
    "load_memory_bank", "sample_entries", "sample_from_bank", "sample_snippets",
    "save_memory_bank", "shard_memory_bank", "slerp", "svd_compress",
]
