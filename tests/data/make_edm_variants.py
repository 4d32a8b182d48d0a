"""Writes tests/data/edm_variants.npz: EDM's own networks at the limits of their arguments.

Run with a local checkout of NVlabs/edm (commit 008a4e5) and torch (CPU):

    python tests/data/make_edm_variants.py /path/to/edm

For each variant below: EDMPrecond(**config) built by EDM's `training/networks.py`, every
parameter replaced by N(0, 0.2^2) draws (zero-initialised layers must matter), every
parameter and buffer rounded to float16 (stored as float16 without loss), run in eval mode in float32 on one input batch. Keys `<variant>/param/<name>` (PyTorch layout),
`<variant>/input/{x_nchw, sigma, class_labels, augment_labels}` (absent where None),
`<variant>/output/D_nchw`, `<variant>/config_json`.
"""
import json
import sys

import numpy as np

# The arguments of SongUNet / DhariwalUNet at their limits, one variant each. 8x8x2 images.
BASE = dict(img_resolution=8, img_channels=2, model_type="SongUNet", model_channels=8,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
VARIANTS = {
    # NCSN++ layout: Fourier embedding (2x channels), residual encoder, skip decoder,
    # [1,3,3,1] resampling; class labels and augmentation labels
    "ncsnpp_aug": dict(BASE, label_dim=3, augment_dim=5, embedding_type="fourier",
                       channel_mult_noise=2, encoder_type="residual", decoder_type="skip",
                       resample_filter=[1, 3, 3, 1]),
    # skip encoder, standard decoder, embedding width x2, no labels, three levels
    "skip_encoder": dict(BASE, channel_mult=[1, 2, 1], channel_mult_emb=2,
                         encoder_type="skip", resample_filter=[1, 3, 3, 1],
                         attn_resolutions=[8, 2]),
    # no residual blocks per level, one level only, attention at a resolution absent
    # from the network (ignored), labels but none passed (the preconditioner's zeros)
    "no_blocks_one_level": dict(BASE, channel_mult=[3], num_blocks=0, attn_resolutions=[5],
                                label_dim=4),
    # ADM: no attention outside the middle block, augmentation labels, no class labels,
    # embedding width x1 (64 channels: its attention heads are 64 channels wide)
    "adm_aug": dict(img_resolution=8, img_channels=2, model_type="DhariwalUNet",
                    model_channels=64, channel_mult=[1], num_blocks=1, attn_resolutions=[],
                    dropout=0.0, augment_dim=3, channel_mult_emb=1),
    # ADM under 64 channels: 32 // 64 = 0 heads, so EDM builds no attention unit at all,
    # not even in the middle block
    "adm_narrow": dict(img_resolution=8, img_channels=2, model_type="DhariwalUNet",
                       model_channels=32, channel_mult=[1], num_blocks=1, attn_resolutions=[8],
                       dropout=0.0, label_dim=3),
}


def main(edm_root: str, out: str = "tests/data/edm_variants.npz"):
    sys.path.insert(0, edm_root)
    import torch
    from training.networks import EDMPrecond

    arrays = {}
    for i, (name, config) in enumerate(VARIANTS.items()):
        torch.manual_seed(i)
        net = EDMPrecond(**config).eval()
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
            for t in net.state_dict().values():  # buffers too (NCSN++'s Fourier frequencies)
                t.copy_(t.half().float())  # stored as float16 without loss
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(3, config["img_channels"], 8, 8, generator=g)
        sigma = torch.tensor([0.02, 0.7, 30.0])
        labels = augment = None
        if config.get("label_dim") and name != "no_blocks_one_level":
            labels = torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), config["label_dim"]).float()
        if config.get("augment_dim"):
            augment = torch.randn(3, config["augment_dim"], generator=g)
        kwargs = {} if augment is None else {"augment_labels": augment}
        with torch.no_grad():
            denoised = net(x, sigma, labels, **kwargs)
        for k, v in net.state_dict().items():
            arrays[f"{name}/param/{k}"] = v.numpy().astype(np.float16)  # exact
        arrays[f"{name}/input/x_nchw"] = x.numpy()
        arrays[f"{name}/input/sigma"] = sigma.numpy()
        if labels is not None:
            arrays[f"{name}/input/class_labels"] = labels.numpy()
        if augment is not None:
            arrays[f"{name}/input/augment_labels"] = augment.numpy()
        arrays[f"{name}/output/D_nchw"] = denoised.numpy()
        arrays[f"{name}/config_json"] = np.array(json.dumps(config))
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:])
