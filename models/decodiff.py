"""DeCo-Diff (Beizaee et al., CVPR 2025): deviation-correcting diffusion, one model for many categories.

Training corrupts only part of an image: a random patch mask m (1 = kept clean) chooses where
    x_t = m x0 + (1 - m) (sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) n),
with n Gaussian noise in part and, elsewhere, patches of the batch's own images shuffled across it (a
plausible "wrong" texture). The UNet, told the category, predicts the deviation
    d = (x_t - x0) / sqrt(1 - alpha_bar_t),
which is zero where the image is clean: it learns to leave normal texture alone and to point at what is not.

Inference takes the clean image as the state at step 8 of 10 and corrects it in a few deterministic steps
(8, 6, 4, 2, 0): x0 = x_t - sqrt(1 - alpha_bar_t) d, x_prev = x0 + sqrt(1 - alpha_bar_prev) d. The map is
the difference between the image and its correction: the paper multiplies an image-space term with a
term in the latent space of a pretrained VAE. There is no such VAE here (no downloaded weights), so the
model works in pixel space, and the latent term is replaced by its nearest pixel-space analogue: the
difference in the standardised units the network sees, averaged over channels and pooled over 8 x 8
pixels (the VAE's downsampling factor). The score is the map's maximum, as in the paper, unless training's
validation chose the mean of the top-k values of the map measured against good training images' own maps
(models/map_reference.py; a departure from the paper, made only where it validates better).

The paper's hyper-parameters are kept: cosine schedule of 10 steps, corrupted fraction U(0, 0.7), patch
sizes 1..16, shuffled-patch fraction U(0, 0.3), clip 0.4 on [-1, 1] (0.2 here, on [0, 1]) and blur sigma
3 for the image term, clip 0.2 and sigma 1 (on the pooled grid) for the second term.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .diffusionad import gaussian_kernel, smooth_map
from .map_reference import MapReference, top_k_score
from .schedule import cosine_alpha_bar
from .unet import UNet, UNetConfig

METHOD = "decodiff"
PATCH_SIZES = (1, 2, 4, 8, 16)
PATCH_PROBABILITIES = (0.3, 0.25, 0.2, 0.15, 0.1)  # the paper's code, at 256 px


@dataclass
class DeCoDiffConfig:
    method: str = METHOD
    name: str = "small"
    image_size: int = 128
    in_channels: int = 3
    categories: tuple[str, ...] = ("default",)   # the class condition's names; index = position
    unet: UNetConfig = field(default_factory=UNetConfig)
    num_steps: int = 10
    start_step: int = 8          # the clean image is taken as the state at this step
    step_stride: int = 2         # 8, 6, 4, 2, 0
    input_mean: tuple[float, ...] = ()
    input_std: tuple[float, ...] = ()
    image_clip: float = 0.2      # pixel difference (in [0, 1]) that saturates the image term
    image_sigma: float = 3.0     # its blur, pixels
    coarse_factor: int = 8       # the second term's pooling (the VAE's factor)
    coarse_clip: float = 0.2     # standardised difference that saturates it
    coarse_sigma: float = 1.0    # its blur, on the pooled grid
    max_corrupted: float = 0.7   # training: the corrupted fraction of an image is U(0, max_corrupted)
    max_shuffled: float = 0.3    # training: the share of the noise made of shuffled patches is U(0, this)
    top_k: int = 1               # the score: mean of the top-k values (1: the map's maximum, the paper's)
    score_reference: bool = False  # ... of the map against good images' per-pixel maps (map_reference.py)

    def __post_init__(self):
        self.categories = tuple(str(c) for c in self.categories)
        if not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories must be distinct names, at least one: {self.categories}")
        self.input_mean = tuple(float(v) for v in self.input_mean) or (0.5,) * self.in_channels
        self.input_std = tuple(float(v) for v in self.input_std) or (0.5,) * self.in_channels
        if len(self.input_mean) != self.in_channels or len(self.input_std) != self.in_channels:
            raise ValueError(f"input_mean and input_std need {self.in_channels} value(s)")
        if not 0 < self.start_step < self.num_steps or self.step_stride < 1:
            raise ValueError(f"need 0 < start_step < num_steps and step_stride >= 1, got {self.start_step}, "
                             f"{self.num_steps}, {self.step_stride}")
        if not 1 <= self.top_k <= self.image_size**2:
            raise ValueError(f"top_k must be in 1..{self.image_size ** 2}, got {self.top_k}")
        if self.image_size % self.coarse_factor:
            raise ValueError(f"image_size {self.image_size} must be a multiple of coarse_factor {self.coarse_factor}")
        self.unet.in_channels = self.in_channels
        self.unet.image_size = self.image_size
        self.unet.num_classes = len(self.categories)

    @property
    def timesteps(self) -> list[int]:
        """The correction's steps, from start_step down to 0 (8, 6, 4, 2, 0)."""
        return list(range(self.start_step, -1, -self.step_stride)) + ([0] if self.start_step % self.step_stride else [])

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> DeCoDiffConfig:
        d = dict(d)
        unet = d.pop("unet")
        unet = UNetConfig(**{**unet, "channel_mults": tuple(unet["channel_mults"]),
                             "attention_resolutions": tuple(unet["attention_resolutions"])})
        for key in ("categories", "input_mean", "input_std"):
            d[key] = tuple(d.get(key, ()))
        return cls(unet=unet, **d)


# --- the training corruption -------------------------------------------------------------------
def patch_mask(n: int, size: int, corrupted: torch.Tensor, patch: int, generator: torch.Generator) -> torch.Tensor:
    """[N, 1, size, size]: 0 on round(corrupted[i] x patches) random patch x patch squares of image i, 1 elsewhere."""
    if size % patch:
        raise ValueError(f"patch size {patch} must divide the image size {size}")
    cells = (size // patch) ** 2
    order = torch.rand(n, cells, generator=generator).argsort(dim=1)
    count = (corrupted.float() * cells).round().long().clamp(0, cells)
    mask = (order >= count[:, None]).float()  # the first `count` cells of a random order are corrupted
    grid = mask.view(n, 1, size // patch, size // patch)
    return grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def shuffle_patches(x: torch.Tensor, patch: int, generator: torch.Generator) -> torch.Tensor:
    """x with its patch x patch squares permuted across the whole batch (each lands at a random place in a
    random image)."""
    n, c, h, w = x.shape
    cols = F.unfold(x, kernel_size=patch, stride=patch)        # [N, C p p, L]
    cells = cols.transpose(1, 2).reshape(n * cols.shape[2], -1)  # [N L, C p p]
    cells = cells[torch.randperm(cells.shape[0], generator=generator)]
    cols = cells.view(n, -1, cols.shape[1]).transpose(1, 2)
    return F.fold(cols, output_size=(h, w), kernel_size=patch, stride=patch)


def masked_q_sample(x0: torch.Tensor, alpha_bar: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = m x0 + (1 - m)(sqrt(ab) x0 + sqrt(1 - ab) noise); alpha_bar per image, [N]."""
    ab = alpha_bar.view(-1, 1, 1, 1)
    return mask * x0 + (1 - mask) * (ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


def deviation(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The training target d = (x_t - x0) / sqrt(1 - ab): zero where the mask kept x0 clean."""
    return (x_t - x0) / (1 - alpha_bar.view(-1, 1, 1, 1)).sqrt()


def corrupt(x0: torch.Tensor, config: DeCoDiffConfig, alpha_bar: torch.Tensor, t: torch.Tensor,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch's (x_t, target): the paper's masked forward process with shuffled-patch noise.
    One patch size per batch (as the paper's code), drawn with its probabilities."""
    n, _, size, _ = x0.shape
    sizes = [p for p in PATCH_SIZES if size % p == 0]
    weights = torch.tensor([PATCH_PROBABILITIES[PATCH_SIZES.index(p)] for p in sizes])
    patch = sizes[int(torch.multinomial(weights, 1, generator=generator))]
    mask = patch_mask(n, size, torch.rand(n, generator=generator) * config.max_corrupted, patch, generator)
    gaussian = patch_mask(n, size, torch.rand(n, generator=generator) * config.max_shuffled, patch, generator)
    shuffled = shuffle_patches(x0.cpu(), patch, generator)
    noise = gaussian * torch.randn(x0.shape, generator=generator) + (1 - gaussian) * shuffled
    mask, noise = mask.to(x0.device), noise.to(x0.device)
    ab = alpha_bar.to(x0.device)[t]
    x_t = masked_q_sample(x0, ab, mask, noise)
    return x_t, deviation(x_t, x0, ab)


# --- the model ---------------------------------------------------------------------------------
CATEGORY_OFFSET = 1_000_003  # DeCoDiff.category_index holds this + the category's index


class DeCoDiff(nn.Module):
    """forward(images in [0, 1], classes [N] or None) -> (anomaly map [N, 1, H, W] in [0, 1], score [N]).

    Without `classes` every image is taken for `category` (set_category), the first one by default: that
    is how a multi-category model is exported and served, one graph per category."""

    def __init__(self, config: DeCoDiffConfig):
        super().__init__()
        self.config = config
        self.unet = UNet(config.unet)
        self.register_buffer("alpha_bar", cosine_alpha_bar(config.num_steps), persistent=False)
        shape = (1, config.in_channels, 1, 1)
        self.register_buffer("input_mean", torch.tensor(config.input_mean).view(shape), persistent=False)
        self.register_buffer("input_std", torch.tensor(config.input_std).view(shape), persistent=False)
        self.register_buffer("image_kernel", gaussian_kernel(config.image_sigma), persistent=False)
        self.register_buffer("coarse_kernel", gaussian_kernel(config.coarse_sigma), persistent=False)
        self.map_reference = MapReference(len(config.categories), config.image_size)
        # The category every image is taken for when forward gets no classes. A buffer, not an int: an exported
        # graph holds it as a named constant (export/onnx_export.py: CATEGORY_CONSTANT), so one export serves
        # every category. Stored offset: the exporter shares one initializer among equal constants, and a
        # plain 0 or 1 would be shared with the attention's split indices (export/onnx_export.py checks it).
        self.register_buffer("category_index", torch.tensor(CATEGORY_OFFSET), persistent=False)

    @property
    def category(self) -> int:
        return int(self.category_index) - CATEGORY_OFFSET

    def set_category(self, name: str) -> DeCoDiff:
        if name not in self.config.categories:
            raise ValueError(f"unknown category {name!r}; this model knows {', '.join(self.config.categories)}")
        self.category_index.fill_(CATEGORY_OFFSET + self.config.categories.index(name))
        return self

    def set_network_dtype(self, dtype: torch.dtype) -> DeCoDiff:
        """The UNet in dtype (fp16 or bf16 on a GPU); the correction's update and the map stay in fp32."""
        self.unet.to(dtype)
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.input_mean) / self.input_std

    def correct(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The deterministic correction of x (normalised) from start_step down to 0."""
        steps = self.config.timesteps
        x_t, dtype = x, self.unet.conv_in.weight.dtype  # the UNet's (set_network_dtype); the update in fp32
        for t, t_prev in zip(steps, steps[1:] + [-1], strict=True):
            d = self.unet(x_t.to(dtype), torch.full((x.shape[0],), t, device=x.device), classes).float()
            x0 = x_t - (1 - self.alpha_bar[t]).sqrt() * d
            x_t = x0 + (1 - self.alpha_bar[t_prev]).sqrt() * d if t_prev >= 0 else x0
        return x_t

    def anomaly_map(self, x: torch.Tensor, corrected: torch.Tensor) -> torch.Tensor:
        """sqrt(image term x coarse term), each clipped to [0, 1] and blurred (module docstring)."""
        cfg = self.config
        difference = (corrected - x).abs()
        pixel = (difference * self.input_std).amax(dim=1, keepdim=True)   # in [0, 1] pixel units
        pixel = smooth_map((pixel / cfg.image_clip).clamp(0, 1), self.image_kernel)
        coarse = F.avg_pool2d(difference.mean(dim=1, keepdim=True), cfg.coarse_factor)
        coarse = smooth_map((coarse / cfg.coarse_clip).clamp(0, 1), self.coarse_kernel)
        coarse = F.interpolate(coarse, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (pixel * coarse).clamp_min(0).sqrt()

    def score(self, anomaly_map: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """The mean of the top-k values of the map, or with score_reference of its z against the category's
        good maps (squashed into (0, 1)); `classes` as for forward."""
        cfg = self.config
        values = self.map_reference(anomaly_map, self._classes(anomaly_map, classes)) if cfg.score_reference \
            else anomaly_map
        return top_k_score(values, cfg.top_k, squashed=cfg.score_reference)

    def _classes(self, images: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        if classes is not None:
            return classes
        # two constants, neither equal to the stored value (see __init__)
        return self.category_index.expand(images.shape[0]) - (CATEGORY_OFFSET - 1) - 1

    def forward(self, images: torch.Tensor, classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        classes = self._classes(images, classes)
        x = self.normalize(images)
        anomaly_map = self.anomaly_map(x, self.correct(x, classes))
        return anomaly_map, self.score(anomaly_map, classes)
