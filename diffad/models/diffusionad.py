"""DiffusionAD: the two networks, the schedule and the fixed noise, as one inference module.

forward(images in [0, 1]) -> (anomaly map in [0, 1], image score). The noise added at t_s and t_l is a
seeded buffer saved with the weights, so an image always gets the same score, alone or in a batch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .schedule import LinearNoiseSchedule, ScheduleConfig
from .segmentation import SegmentationConfig, SegmentationNet
from .unet import UNet, UNetConfig


@dataclass
class ModelConfig:
    name: str = "diffad"
    image_size: int = 256
    in_channels: int = 3
    unet: UNetConfig = field(default_factory=UNetConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    t_s: int = 200
    t_l: int = 400
    w: float = 1.0
    top_k: int = 50
    noise_seed: int = 0

    def __post_init__(self):
        # Keep the sub-configs consistent with the image: one source of truth for size and channels.
        self.unet.in_channels = self.in_channels
        self.unet.image_size = self.image_size
        self.segmentation.in_channels = 2 * self.in_channels
        if not 0 <= self.t_s < self.t_l < self.schedule.num_steps:
            raise ValueError(f"need 0 <= t_s < t_l < {self.schedule.num_steps}, got t_s={self.t_s}, t_l={self.t_l}")
        if not 1 <= self.top_k <= self.image_size**2:
            raise ValueError(f"top_k must be in 1..{self.image_size ** 2}, got {self.top_k}")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        unet = d.pop("unet")
        unet = UNetConfig(**{**unet, "channel_mults": tuple(unet["channel_mults"]),
                             "attention_resolutions": tuple(unet["attention_resolutions"])})
        seg = d.pop("segmentation")
        seg = SegmentationConfig(**{**seg, "channel_mults": tuple(seg["channel_mults"])})
        schedule = ScheduleConfig(**d.pop("schedule"))
        return cls(unet=unet, segmentation=seg, schedule=schedule, **d)


def fixed_noise(config: ModelConfig) -> torch.Tensor:
    """The seeded noise for the two steps: [2, C, H, W] (index 0 for t_s, 1 for t_l)."""
    g = torch.Generator().manual_seed(config.noise_seed)
    return torch.randn(2, config.in_channels, config.image_size, config.image_size, generator=g)


class DiffusionAD(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.unet = UNet(config.unet)
        self.segmentation = SegmentationNet(config.segmentation)
        self.schedule = LinearNoiseSchedule(config.schedule)
        self.register_buffer("noise", fixed_noise(config))

    def _apply(self, fn, recurse=True):
        # model.to(device) moves parameters and buffers; the schedule's tables follow the device (not the
        # dtype: they stay float32) so that no step copies them from the host, which CUDA graphs forbid.
        super()._apply(fn, recurse)
        self.schedule.to(self.noise.device)
        return self

    # --- inference -------------------------------------------------------------------------------
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Norm-guided one-step reconstruction of x in [-1, 1]; both UNet passes in one batched call."""
        cfg, n = self.config, x.shape[0]
        sched = self.schedule
        x_ts = sched.q_sample(x, cfg.t_s, self.noise[0:1].expand_as(x))
        x_tl = sched.q_sample(x, cfg.t_l, self.noise[1:2].expand_as(x))
        # made on the input's device: a host-to-device copy would break CUDA-graph capture
        t = torch.cat([torch.full((n,), cfg.t_s, device=x.device), torch.full((n,), cfg.t_l, device=x.device)])
        eps = self.unet(torch.cat([x_ts, x_tl]), t)
        x0_s = sched.predict_x0(x_ts, cfg.t_s, eps[:n])
        x0_l = sched.predict_x0(x_tl, cfg.t_l, eps[n:]).clamp(-1.0, 1.0)
        return sched.guided_x0(x0_s, x0_l, cfg.t_s, cfg.w)

    def segment(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Anomaly logits [N, 1, H, W] for images and their reconstructions, both in [-1, 1]."""
        return self.segmentation(torch.cat([x, reconstruction], dim=1))

    def score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Image score: the mean of the top-k map values."""
        return anomaly_map.flatten(1).topk(self.config.top_k, dim=1).values.mean(dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N, C, H, W] in [0, 1] -> (anomaly map [N, 1, H, W] in [0, 1], score [N])."""
        x = images * 2.0 - 1.0
        anomaly_map = torch.sigmoid(self.segment(x, self.reconstruct(x)))
        return anomaly_map, self.score(anomaly_map)

    # --- iterative reconstruction, for comparison ------------------------------------------------
    @torch.no_grad()
    def reconstruct_ddim(self, x: torch.Tensor, num_steps: int) -> torch.Tensor:
        """DDIM (eta = 0) from x noised at t_s with the fixed noise, in num_steps UNet passes."""
        sched, cfg = self.schedule, self.config
        x_t = sched.q_sample(x, cfg.t_s, self.noise[0:1].expand_as(x))
        steps = sched.ddim_timesteps(cfg.t_s, num_steps)
        for t, t_prev in zip(steps, steps[1:] + [-1], strict=True):
            eps = self.unet(x_t, torch.full((x.shape[0],), t, device=x.device))
            x_t = sched.ddim_step(x_t, t, t_prev, eps)
        return x_t

    @torch.no_grad()
    def reconstruct_ancestral(self, x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Full DDPM ancestral denoising from t_s: t_s + 1 UNet passes, seeded step noise."""
        sched, cfg = self.schedule, self.config
        g = torch.Generator(device=x.device).manual_seed(cfg.noise_seed + 1 if seed is None else seed)
        x_t = sched.q_sample(x, cfg.t_s, self.noise[0:1].expand_as(x))
        for t in range(cfg.t_s, -1, -1):
            eps = self.unet(x_t, torch.full((x.shape[0],), t, device=x.device))
            x_t = sched.ancestral_step(x_t, t, eps, torch.randn(x.shape, generator=g, device=x.device))
        return x_t
