"""A stand-in for pytorch-fid's Inception weights, shared by the Inception and notebook tests
(torch and pytorch-fid are imported on use: the tests that need them skip without them)."""


def random_fid_state_dict(*args, **kwargs):
    """Stands in for the weight download: torchvision's Inception-v3 with pytorch-fid's FID
    blocks, random convolutions and random BN affine parameters (strict loading in
    ``fid_inception_v3`` checks that the keys are exactly those of the real file)."""
    import torch
    from pytorch_fid import inception as pf

    torch.manual_seed(0)
    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return net.state_dict()
