"""The image score measured against good parts' own maps, place by place.

On an object, the anomaly map of every good part is high at the same places: a rim, an edge, a
reflection. A top-k mean (or the maximum) of the map then ranks good parts by their rims rather than by
defects: DeCo-Diff on `mvtec3d_tire` scored good tires above defective ones. Standardising each pixel
against the maps of good training images, z = (map - mean) / (std + floor), counts only what lies above a
place's usual level. The image score is then z's top-k mean, squashed into (0, 1) by a monotone map,
(1 + z / (1 + |z|)) / 2, so that thresholds and the API's 0..1 scale keep their meaning while rank metrics
(AUROC) see z itself. The map the model outputs is not changed.

One reference per category (a multi-category model's images are gathered by their class), kept as buffers
so that the model file and the exported graph carry it. Until fitted it is the identity (mean 0, scale 1).
Both methods use it: DeCo-Diff (one reference per category) and DiffusionAD (one); training fits it on good
training images and keeps it in the score only where the validation set says so (training/score_rule.py).
"""

from __future__ import annotations

import torch
from torch import nn

STD_FLOOR = 0.01  # a place where every good map is the same would otherwise divide by zero


class MapReference(nn.Module):
    def __init__(self, num_categories: int, size: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_categories, 1, size, size))
        self.register_buffer("inverse_std", torch.ones(num_categories, 1, size, size))

    @torch.no_grad()
    def fit(self, category: int, maps: torch.Tensor) -> None:
        """Per-pixel statistics of `maps` [N, 1, H, W], good images of `category`."""
        maps = maps.to(self.mean.device)
        self.mean[category] = maps.mean(dim=0)
        self.inverse_std[category] = 1 / (maps.std(dim=0, unbiased=False) + STD_FLOOR)

    def forward(self, anomaly_map: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """z [N, 1, H, W] of maps [N, 1, H, W], each against its own category's reference (classes None: the
        first category's, for a model of one)."""
        if classes is None:
            return (anomaly_map - self.mean[:1]) * self.inverse_std[:1]
        return (anomaly_map - self.mean[classes]) * self.inverse_std[classes]


def squash(z: torch.Tensor) -> torch.Tensor:
    """A monotone map of the real line into (0, 1); 0.5 at z = 0."""
    return 0.5 * (1 + z / (1 + z.abs()))


def top_k_score(values: torch.Tensor, top_k: int, squashed: bool) -> torch.Tensor:
    """The mean of each image's top_k values [N, ...] -> [N] (top_k 1: the maximum), squashed into (0, 1) when
    the values are z rather than a map."""
    top = values.flatten(1).topk(top_k, dim=1).values.mean(dim=1)
    return squash(top) if squashed else top
