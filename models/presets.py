"""Model presets and their cost: parameter count and multiply-accumulates per image."""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from .decodiff import DeCoDiffConfig
from .diffusionad import DiffusionAD, ModelConfig
from .segmentation import SegmentationConfig
from .unet import UNetConfig

PRESET_NAMES = ("tiny", "small", "paper")
PAPER_IMAGE_SIZE, PAPER_TOP_K, PAPER_MAP_SIGMA = 256, 50, 4.0


def top_k_for(image_size: int) -> int:
    """The paper's k = 50 at 256 x 256, scaled with the image area so it covers the same fraction."""
    return max(1, round(PAPER_TOP_K * (image_size / PAPER_IMAGE_SIZE) ** 2))


def map_sigma_for(image_size: int) -> float:
    """The paper's smoothing (sigma 4 at 256 px), scaled with the image side."""
    return round(PAPER_MAP_SIGMA * image_size / PAPER_IMAGE_SIZE, 3)


def preset(name: str, image_size: int | None = None, in_channels: int = 3) -> ModelConfig:
    """A model configuration by preset name; image_size overrides the preset's own."""
    if name == "paper":
        # The published model: about 132 M + 28 M parameters at 256 px.
        size = image_size or 256
        unet = UNetConfig(base_channels=128, channel_mults=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                          attention_resolutions=(32, 16, 8), num_heads=4)
        seg = SegmentationConfig(base_channels=64, channel_mults=(1, 2, 4, 8, 8, 8))
    elif name == "small":
        # The best quality that trains on a 2-core CPU in 30 minutes (see README, "Presets").
        size = image_size or 128
        unet = UNetConfig(base_channels=16, channel_mults=(1, 2, 4, 4), num_res_blocks=1,
                          attention_resolutions=(16,), num_heads=4)
        seg = SegmentationConfig(base_channels=16, channel_mults=(1, 2, 4, 8, 8))
    elif name == "tiny":
        # For tests: trains and runs in seconds.
        size = image_size or 32
        unet = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                          attention_resolutions=(16,), num_heads=2)
        seg = SegmentationConfig(base_channels=8, channel_mults=(1, 2, 4))
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return ModelConfig(name=name, image_size=size, in_channels=in_channels, unet=unet, segmentation=seg,
                       top_k=top_k_for(size), map_sigma=map_sigma_for(size))


def decodiff_preset(name: str, categories: tuple[str, ...], image_size: int | None = None,
                    in_channels: int = 3) -> DeCoDiffConfig:
    """A DeCo-Diff configuration whose UNet is the DiffusionAD preset's of the same name (same cost per pass)."""
    base = preset(name, image_size, in_channels)
    base.unet.scale_shift_norm = True  # so that the narrow UNets see t and the category (models/unet.py)
    return DeCoDiffConfig(name=name, image_size=base.image_size, in_channels=in_channels, categories=categories,
                          unet=base.unet, coarse_factor=8 if base.image_size >= 64 else 4,
                          image_sigma=3.0 if base.image_size >= 64 else 1.5)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_gmac(model: DiffusionAD) -> dict[str, float]:
    """GMAC for one image through the full pipeline: DiffusionAD's one-step (two UNet passes +
    segmentation), or DeCo-Diff's correction (one UNet pass per step).

    Counted by PyTorch's FLOP counter (convolutions, matrix products, attention) on one image;
    a multiply-accumulate is two FLOPs. Normalisations and activations are not counted.
    """
    if any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters()):
        # counted in the default layout: on a channels-last model the counter misses the attention products
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    cfg = model.config
    device = next(model.parameters()).device
    x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    if getattr(cfg, "method", "diffusionad") == "decodiff":  # its correction: one UNet pass per step
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.unet(x, torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long,
                                                                                       device=device))
        unet = counter.get_total_flops() / 2e9
        return {"unet_pass": unet, "pipeline": len(cfg.timesteps) * unet}
    was_training = model.training
    model.eval()  # a forward pass in training mode would move BatchNorm's running statistics
    with torch.no_grad():
        with FlopCounterMode(display=False) as unet_counter:
            model.unet(x, torch.zeros(1, dtype=torch.long, device=device))
        with FlopCounterMode(display=False) as seg_counter:
            model.segmentation(model.segmentation_features(x, x))
    model.train(was_training)
    unet = unet_counter.get_total_flops() / 2e9
    seg = seg_counter.get_total_flops() / 2e9
    return {"unet_pass": unet, "segmentation": seg, "pipeline": 2 * unet + seg}


def describe(model: DiffusionAD) -> dict[str, float]:
    """Parameters (millions) and GMAC per image, for logs and `diffad presets`."""
    gmac = count_gmac(model)
    return {
        "unet_params_m": count_parameters(model.unet) / 1e6,
        "segmentation_params_m": count_parameters(model.segmentation) / 1e6,
        "unet_gmac_per_pass": gmac["unet_pass"],
        "segmentation_gmac": gmac["segmentation"],
        "pipeline_gmac_per_image": gmac["pipeline"],
    }
