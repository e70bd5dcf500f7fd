"""The segmentation network: finds where an image differs from its reconstruction.

A DRAEM-style discriminative encoder-decoder: conv-BN-ReLU blocks, max-pool down, bilinear up, skip
connections. Input: the image and its reconstruction stacked on channels (2 x C), or their difference
(C; ModelConfig.segmentation_input); output: one logit per pixel (the anomaly map is its sigmoid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SegmentationConfig:
    in_channels: int = 6
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4, 8, 8, 8)


def conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
    )


class SegmentationNet(nn.Module):
    """[N, in_channels, H, W] (image and reconstruction, or their difference) -> [N, 1, H, W] anomaly logits."""

    def __init__(self, config: SegmentationConfig):
        super().__init__()
        self.config = cfg = config
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        self.encoder = nn.ModuleList()
        ch = cfg.in_channels
        for width in widths:
            self.encoder.append(conv_block(ch, width))
            ch = width
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        # Each decoder step: upsample, reduce to the skip's width, then merge with the skip.
        self.reduce = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.reduce.append(nn.Sequential(
                nn.Conv2d(ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            ))
            self.decoder.append(conv_block(2 * width, width))
            ch = width
        self.head = nn.Conv2d(ch, 1, 3, padding=1)

    @property
    def min_size_multiple(self) -> int:
        return 2 ** (len(self.config.channel_mults) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for reduce, block in zip(self.reduce, self.decoder, strict=True):
            x = reduce(self.upsample(x))
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)
