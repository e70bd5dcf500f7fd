"""DiffusionAD: the two networks, the schedule and the fixed noise, as one inference module.

forward(images in [0, 1]) -> (anomaly map in [0, 1], image score). The noise added at t_s and t_l is a
seeded buffer saved with the weights, so an image always gets the same score, alone or in a batch.

Two per-model constants shape what the networks see and what the map shows, and travel inside the model
(and so inside the exported graph): the input standardisation (per-channel mean and std of the category's
good images: a faint texture then fills the networks' range instead of a sliver of [-1, 1], so the noise at
t_s does not drown it) and the Gaussian smoothing of the map before the top-k score. The score may also be
taken of the map's z against good training images' maps, place by place (models/map_reference.py), where
training's validation set prefers it: on an object every good part's map is high at the same places.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .d3ad import D3ADConfig, guided_reconstruction, score_bins, start_steps
from .map_reference import MapReference, top_k_score
from .schedule import LinearNoiseSchedule, ScheduleConfig, clamp
from .segmentation import SegmentationConfig, SegmentationNet
from .unet import UNet, UNetConfig

SEGMENTATION_INPUTS = ("pair", "difference")


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
    score_reference: bool = False  # score the map's z against good images' per-pixel maps (map_reference.py)
    noise_seed: int = 0
    # x = (image - input_mean) / input_std per channel; empty = 0.5 and 0.5, the classic [-1, 1] scaling.
    input_mean: tuple[float, ...] = ()
    input_std: tuple[float, ...] = ()
    map_sigma: float = 0.0      # Gaussian smoothing of the map (pixels) before the score; 0 = none
    # What the segmentation network sees: "pair", the image and its reconstruction stacked (the paper's), or
    # "difference", only image - reconstruction, so that the map cannot come from the image alone.
    segmentation_input: str = "pair"
    d3ad: D3ADConfig = field(default_factory=D3ADConfig)  # mode "off": the one-step reconstruction

    def __post_init__(self):
        self.input_mean = tuple(float(v) for v in self.input_mean) or (0.5,) * self.in_channels
        self.input_std = tuple(float(v) for v in self.input_std) or (0.5,) * self.in_channels
        if len(self.input_mean) != self.in_channels or len(self.input_std) != self.in_channels:
            raise ValueError(f"input_mean and input_std need {self.in_channels} value(s), "
                             f"got {self.input_mean} and {self.input_std}")
        if min(self.input_std) <= 0:
            raise ValueError(f"input_std must be positive, got {self.input_std}")
        if self.map_sigma < 0:
            raise ValueError(f"map_sigma must be >= 0, got {self.map_sigma}")
        # Keep the sub-configs consistent with the image: one source of truth for size and channels.
        self.unet.in_channels = self.in_channels
        self.unet.image_size = self.image_size
        if self.segmentation_input not in SEGMENTATION_INPUTS:
            raise ValueError(f"segmentation_input must be one of {SEGMENTATION_INPUTS}, "
                             f"got {self.segmentation_input!r}")
        self.segmentation.in_channels = (2 if self.segmentation_input == "pair" else 1) * self.in_channels
        if not 0 <= self.t_s < self.t_l < self.schedule.num_steps:
            raise ValueError(f"need 0 <= t_s < t_l < {self.schedule.num_steps}, got t_s={self.t_s}, t_l={self.t_l}")
        if self.d3ad.max_step >= self.schedule.num_steps:
            raise ValueError(f"d3ad max_step must be below {self.schedule.num_steps}, got {self.d3ad.max_step}")
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
        d["d3ad"] = D3ADConfig(**d.get("d3ad", {}))  # files from before D3AD lack it: one-step
        for key in ("input_mean", "input_std"):  # JSON has lists; files from before these fields lack them
            d[key] = tuple(d.get(key, ()))
        return cls(unet=unet, segmentation=seg, schedule=schedule, **d)


def fixed_noise(config: ModelConfig) -> torch.Tensor:
    """The seeded noise for the two steps: [2, C, H, W] (index 0 for t_s, 1 for t_l)."""
    g = torch.Generator().manual_seed(config.noise_seed)
    return torch.randn(2, config.in_channels, config.image_size, config.image_size, generator=g)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian of radius round(4 sigma) (at least 1 tap each side)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def smooth_map(anomaly_map: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of [N, 1, H, W] with reflected borders: each image on its own."""
    r = kernel.numel() // 2
    x = F.pad(anomaly_map, (r, r, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


def smooth_map_at(anomaly_map: torch.Tensor, sigma: float) -> torch.Tensor:
    """[N, 1, H, W] smoothed as the model smooths its map at `sigma` pixels; unchanged at 0."""
    return smooth_map(anomaly_map, gaussian_kernel(sigma)) if sigma > 0 else anomaly_map

class DiffusionAD(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.unet = UNet(config.unet)
        self.segmentation = SegmentationNet(config.segmentation)
        self.schedule = LinearNoiseSchedule(config.schedule)
        self.register_buffer("noise", fixed_noise(config))
        # Derived from the configuration (stored with it), so not saved as weights.
        shape = (1, config.in_channels, 1, 1)
        self.register_buffer("input_mean", torch.tensor(config.input_mean).view(shape), persistent=False)
        self.register_buffer("input_std", torch.tensor(config.input_std).view(shape), persistent=False)
        kernel = gaussian_kernel(config.map_sigma) if config.map_sigma > 0 else torch.ones(1)
        self.register_buffer("map_kernel", kernel, persistent=False)
        self.register_buffer("d3ad_bin_edges", torch.tensor(config.d3ad.bin_edges or (0.0,)), persistent=False)
        self.map_reference = MapReference(1, config.image_size)  # the identity until training fits it

    def set_d3ad(self, d3ad: D3ADConfig) -> None:
        """Switch the reconstruction: D3AD (fixed or dynamic noise level) or back to one-step (mode "off")."""
        self.config.d3ad = d3ad
        with torch.inference_mode(False):  # as set_map_sigma: a buffer that can still be traced
            self.d3ad_bin_edges = torch.tensor(d3ad.bin_edges or (0.0,), device=self.d3ad_bin_edges.device)

    def set_map_sigma(self, sigma: float) -> None:
        """Change the map smoothing (training chooses it on the validation set); 0 turns it off."""
        if sigma < 0:
            raise ValueError(f"map_sigma must be >= 0, got {sigma}")
        self.config.map_sigma = float(sigma)
        with torch.inference_mode(False):  # a buffer made under inference mode could never be traced or exported
            kernel = gaussian_kernel(sigma) if sigma > 0 else torch.ones(1)
            self.map_kernel = kernel.to(self.map_kernel.device)

    # --- precision -------------------------------------------------------------------------------
    @property
    def network_dtype(self) -> torch.dtype:
        """The dtype the two networks compute in (float32 unless set_network_dtype changed it)."""
        return self.segmentation.head.weight.dtype

    def set_network_dtype(self, dtype: torch.dtype) -> DiffusionAD:
        """Put the UNet and the segmentation network in dtype (fp16 or bf16 on a GPU); the rest stays fp32.

        What is kept in fp32 is what fp16 would break: the input standardisation and the noising (a faint
        texture is a small difference of large numbers), the x0 prediction (it divides by sqrt(alpha_bar),
        amplifying the error at t_l), the guided blend and clip, and the sigmoid, smoothing and top-k score.
        The networks take their input cast down and hand their output back cast up.
        """
        self.unet.to(dtype)
        self.segmentation.to(dtype)
        return self

    def _apply(self, fn, recurse=True):
        # model.to(device) moves parameters and buffers; the schedule's tables follow the device (not the
        # dtype: they stay float32) so that no step copies them from the host, which CUDA graphs forbid.
        super()._apply(fn, recurse)
        self.schedule.to(self.noise.device)
        return self

    # --- inference -------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the networks' units: (image - input_mean) / input_std per channel."""
        return (images - self.input_mean) / self.input_std

    @property
    def pixel_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid pixel range [0, 1] in the networks' units, per channel: reconstructions are clipped to it."""
        return (0.0 - self.input_mean) / self.input_std, (1.0 - self.input_mean) / self.input_std

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Norm-guided one-step reconstruction of x (normalised); both UNet passes in one batched call."""
        cfg, n = self.config, x.shape[0]
        sched = self.schedule
        x_ts = sched.q_sample(x, cfg.t_s, self.noise[0:1].expand_as(x))
        x_tl = sched.q_sample(x, cfg.t_l, self.noise[1:2].expand_as(x))
        # made on the input's device: a host-to-device copy would break CUDA-graph capture
        t = torch.cat([torch.full((n,), cfg.t_s, device=x.device), torch.full((n,), cfg.t_l, device=x.device)])
        eps = self._eps(torch.cat([x_ts, x_tl]), t)
        x0_s = sched.predict_x0(x_ts, cfg.t_s, eps[:n])
        x0_l = clamp(sched.predict_x0(x_tl, cfg.t_l, eps[n:]), self.pixel_bounds)
        return sched.guided_x0(x0_s, x0_l, cfg.t_s, cfg.w, self.pixel_bounds)

    def reconstruct_d3ad(self, x: torch.Tensor, d3ad: D3ADConfig | None = None) -> torch.Tensor:
        """D3AD's noise-free, input-guided DDIM (models/d3ad.py) from each image's start step: max_step
        ("fixed"), or from the bin of its one-step score among good images' ("dynamic"). `d3ad`: other
        settings than the model's own (benchmarks compare modes on one model)."""
        edges = self.d3ad_bin_edges if d3ad is None else torch.tensor(d3ad.bin_edges or (0.0,), device=x.device)
        d3ad = d3ad or self.config.d3ad
        if d3ad.mode == "dynamic":
            start = self._dynamic_start_steps(x, edges, d3ad.max_step)
        else:
            start = torch.full((x.shape[0],), d3ad.max_step, dtype=torch.long, device=x.device)
        return guided_reconstruction(self._eps, self.schedule.alpha_bar, x, start, d3ad.steps, d3ad.w,
                                     self.pixel_bounds)

    def d3ad_start_steps(self, images: torch.Tensor) -> torch.Tensor:
        """The start step each image gets in "dynamic" mode (for inspection and tests)."""
        return self._dynamic_start_steps(self.normalize(images), self.d3ad_bin_edges, self.config.d3ad.max_step)

    def _dynamic_start_steps(self, x: torch.Tensor, edges: torch.Tensor, max_step: int) -> torch.Tensor:
        """The first estimate (the one-step score) binned among good images' scores, as a start step."""
        first_score = self.score(self.anomaly_map(x, self.reconstruct(x)))
        return start_steps(score_bins(first_score, edges), max_step)

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._in_fp32(self.unet(self._to_network(x_t), t))

    def segment(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Anomaly logits [N, 1, H, W] for images and their reconstructions, both normalised."""
        return self._in_fp32(self.segmentation(self._to_network(self.segmentation_features(x, reconstruction))))

    def segmentation_features(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """The segmentation network's input (config.segmentation_input): [x, reconstruction] or their difference."""
        if self.config.segmentation_input == "pair":
            return torch.cat([x, reconstruction], dim=1)
        return x - reconstruction

    def _to_network(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.network_dtype
        return x if dtype == torch.float32 else x.to(dtype)

    def _in_fp32(self, y: torch.Tensor) -> torch.Tensor:
        # only where the networks run in a reduced dtype: training's autocast keeps its own casts
        return y if self.network_dtype == torch.float32 else y.float()

    def anomaly_map(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """The map in [0, 1]: the segmentation's sigmoid, smoothed with map_sigma."""
        anomaly_map = torch.sigmoid(self.segment(x, reconstruction))
        if self.config.map_sigma > 0:
            anomaly_map = smooth_map(anomaly_map, self.map_kernel)
        return anomaly_map

    def score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Image score: the mean of the top-k map values, or with score_reference of the top-k values of the
        map's z against good images' maps (squashed into (0, 1))."""
        cfg = self.config
        values = self.map_reference(anomaly_map) if cfg.score_reference else anomaly_map
        return top_k_score(values, cfg.top_k, squashed=cfg.score_reference)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N, C, H, W] in [0, 1] -> (anomaly map [N, 1, H, W] in [0, 1], score [N])."""
        x = self.normalize(images)
        reconstruction = self.reconstruct(x) if self.config.d3ad.mode == "off" else self.reconstruct_d3ad(x)
        anomaly_map = self.anomaly_map(x, reconstruction)
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
            x_t = sched.ddim_step(x_t, t, t_prev, eps, self.pixel_bounds)
        return x_t

    @torch.no_grad()
    def reconstruct_ancestral(self, x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Full DDPM ancestral denoising from t_s: t_s + 1 UNet passes, seeded step noise."""
        sched, cfg = self.schedule, self.config
        g = torch.Generator(device=x.device).manual_seed(cfg.noise_seed + 1 if seed is None else seed)
        x_t = sched.q_sample(x, cfg.t_s, self.noise[0:1].expand_as(x))
        for t in range(cfg.t_s, -1, -1):
            eps = self.unet(x_t, torch.full((x.shape[0],), t, device=x.device))
            noise = torch.randn(x.shape, generator=g, device=x.device)
            x_t = sched.ancestral_step(x_t, t, eps, noise, self.pixel_bounds)
        return x_t
