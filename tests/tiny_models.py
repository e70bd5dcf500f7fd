"""A tiny model whose maps are not trivial, shared by the tests that export or serve one."""

import torch
from diffad.models.diffusionad import DiffusionAD
from diffad.models.presets import preset
from torch import nn


def perturbed_tiny_model(channels: int = 3, seed: int = 0) -> DiffusionAD:
    """The tiny preset with weights and BatchNorm statistics moved off their initial values, and its score
    taken against a per-pixel map reference that is not the identity.

    Fresh weights give near-constant maps (zero-initialised output layers), which would let a broken
    export or a mixed-up batch pass unnoticed.
    """
    torch.manual_seed(seed)
    config = preset("tiny", in_channels=channels)
    # A per-channel standardisation and a map smoothing that the export must carry into the graph.
    config.input_mean, config.input_std = (0.45, 0.5, 0.55)[:channels], (0.2, 0.25, 0.3)[:channels]
    config.map_sigma = 0.8
    model = DiffusionAD(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
        size = config.image_size
        model.map_reference.fit(0, torch.rand(8, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 0.3)
    model.config.score_reference = True
    return model.eval()
