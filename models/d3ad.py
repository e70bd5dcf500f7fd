"""D3AD's reconstruction (Tebbe & Tayyub, "Dynamic Noise for Diffusion-based Anomaly Detection",
arXiv 2401.04463), as an inference mode of a trained DiffusionAD UNet: no retraining.

Two ideas. (1) Noise-free, input-guided DDIM: start from the input scaled to step T, sqrt(alpha_bar_T) x,
with no noise added, and run DDIM (eta 0) down to a clean image, each step's noise prediction pulled
toward the input:  y_t = sqrt(a_t) x + sqrt(1 - a_t) eps,  eps_hat = eps - w sqrt(1 - a_t) (y_t - x_t)
(DDAD's conditioning, as in the paper's code: y_t is the input carried to step t with the predicted noise).
(2) A noise level per image: a first estimate of how anomalous the image is picks T. The paper's estimate
is a k-NN distance in ImageNet features; none can be had here, so it is the model's own one-step score,
placed in the histogram (10 equal-width bins) of the one-step scores of good images the model did not
train on. Bin b (0..10, as the paper's code numbers them) starts at T = max(b, 2) / 10 x max_step.

The range: the paper's top level is step 80 of 1000 under betas 0.0015..0.0195 (alpha_bar 0.838). This
project's schedule (betas 1e-4..0.02) reaches the same alpha_bar at step 128, and its inputs are
standardised per channel as the paper's VAE latents are scaled to about unit variance, so the same signal
to noise: max_step 128, so T runs 26..128 (the paper: 16..80).

Every image takes the same number of DDIM steps (`steps`), at its own timesteps T (K - k) / K: the graph is
one fixed loop, each image's schedule values gathered for it, so an image's result never depends on the
batch it is in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .schedule import Bounds, clamp

MODES = ("off", "fixed", "dynamic")
NUM_BINS = 10
PAPER_MAX_STEP = 128  # alpha_bar here at 128 = the paper's at 80 (see above)


@dataclass
class D3ADConfig:
    mode: str = "off"          # "off": one-step; "fixed": every image from max_step; "dynamic": T per image
    steps: int = 10            # DDIM steps (UNet passes) of the guided reconstruction, as the paper
    w: float = 4.0             # pull toward the input (the paper's eta2)
    max_step: int = PAPER_MAX_STEP
    bin_edges: tuple[float, ...] = ()  # NUM_BINS + 1 edges of good images' one-step scores ("dynamic")

    def __post_init__(self):
        self.bin_edges = tuple(float(v) for v in self.bin_edges)
        if self.mode not in MODES:
            raise ValueError(f"d3ad mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.steps < 1:
            raise ValueError(f"d3ad steps must be positive, got {self.steps}")
        if self.max_step < self.steps:
            raise ValueError(f"d3ad max_step ({self.max_step}) must be at least its steps ({self.steps})")
        if self.bin_edges and (len(self.bin_edges) != NUM_BINS + 1 or np.any(np.diff(self.bin_edges) < 0)):
            raise ValueError(f"d3ad bin_edges must be {NUM_BINS + 1} ascending values, got {self.bin_edges}")
        if self.mode == "dynamic" and not self.bin_edges:
            raise ValueError("d3ad mode 'dynamic' needs bin_edges: the histogram of good images' one-step scores "
                             "(score_histogram_edges)")


def score_histogram_edges(good_scores: np.ndarray) -> tuple[float, ...]:
    """The NUM_BINS + 1 equal-width bin edges of good images' one-step scores (np.histogram's)."""
    good_scores = np.asarray(good_scores, dtype=np.float64).ravel()
    if good_scores.size < 2:
        raise ValueError(f"the score histogram needs at least 2 good images, got {good_scores.size}")
    _, edges = np.histogram(good_scores, NUM_BINS)
    return tuple(float(e) for e in edges)


def score_bins(scores: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Each score's bin as the paper's code numbers it: np.digitize(s, edges, right=True) - 1, capped at the
    last bin, + 1. So 0 at or below the lowest good score, 1..10 across the good range, 10 above it."""
    at_or_above = (scores[:, None] > edges[None, :].to(scores.dtype)).sum(dim=1)  # = digitize(right=True)
    return (at_or_above - 1).clamp(max=edges.numel() - 2) + 1


def start_steps(bins: torch.Tensor, max_step: int) -> torch.Tensor:
    """The paper's rule: bin b starts at max(b, 2) / NUM_BINS x max_step (rounded), so 0.2 .. 1 x max_step."""
    return torch.round(bins.clamp(min=2).float() * (max_step / NUM_BINS)).long()


def timesteps(start: torch.Tensor, k: int, steps: int) -> torch.Tensor:
    """Step k (0 = the first) of `steps` evenly spaced from each image's start down to start / steps;
    k = steps gives -1 (the clean image)."""
    if k >= steps:
        return torch.full_like(start, -1)
    return torch.round(start.float() * ((steps - k) / steps)).long()


EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided_reconstruction(eps_model: EpsModel, alpha_bar: torch.Tensor, x: torch.Tensor, start: torch.Tensor,
                          steps: int, w: float, bounds: Bounds) -> torch.Tensor:
    """Noise-free, input-guided DDIM from sqrt(alpha_bar[start]) x to a clean image, per-image timesteps.

    x: the input in the networks' units [N, C, H, W]; start: [N] long start steps; eps_model(x_t, t) the
    UNet's noise prediction; alpha_bar the schedule's table; bounds the valid pixel range (x0 clipped to it).
    """
    # alpha_bar with 1.0 in front, so that step -1 (clean) is index 0: a gather, no branch, per image
    table = torch.cat([torch.ones(1, dtype=alpha_bar.dtype, device=alpha_bar.device), alpha_bar])

    def a(t: torch.Tensor) -> torch.Tensor:
        return table[t + 1].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    x_t = a(start).sqrt() * x
    for k in range(steps):
        t, t_next = timesteps(start, k, steps), timesteps(start, k + 1, steps)
        a_t, a_next = a(t), a(t_next)
        eps = eps_model(x_t, t)
        y_t = a_t.sqrt() * x + (1.0 - a_t).sqrt() * eps
        eps_hat = eps - w * (1.0 - a_t).sqrt() * (y_t - x_t)
        x0 = clamp((x_t - (1.0 - a_t).sqrt() * eps_hat) / a_t.sqrt(), bounds)
        x_t = a_next.sqrt() * x0 + (1.0 - a_next).sqrt() * eps_hat
    return x_t
