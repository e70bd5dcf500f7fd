"""The diffusion noise schedule, apart from any network (as diffusers keeps its schedulers).

Timesteps are indices 0..T-1; alpha_bar[t] is the product of (1 - beta_i) for i <= t, so x_t is the
image after t + 1 noising steps. Every function takes and returns tensors and works on any batch size;
per-sample timesteps are long tensors of shape [N].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ScheduleConfig:
    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


# The valid pixel range in the model's units: two floats, or two tensors broadcasting per channel.
Bounds = tuple[torch.Tensor | float, torch.Tensor | float]


def clamp(x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """x clipped to bounds; tensor bounds ([1, C, 1, 1]) clip each channel to its own range."""
    low, high = bounds
    if torch.is_tensor(low):
        return torch.maximum(torch.minimum(x, high.to(x.dtype)), low.to(x.dtype))
    return x.clamp(low, high)


def _per_sample(values: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast against an image batch like `like`."""
    if not torch.is_tensor(t):
        t = torch.full((like.shape[0],), int(t), dtype=torch.long, device=like.device)
    v = values.to(like.device)[t].to(like.dtype)
    return v.reshape(-1, *([1] * (like.dim() - 1)))


class LinearNoiseSchedule:
    """Linear betas (DDPM), the forward process and the one-step, guided, DDIM and ancestral rules."""

    def __init__(self, config: ScheduleConfig = ScheduleConfig()):
        self.config = config
        # float64 for the products, float32 for use: the cumulative product loses precision otherwise.
        betas = np.linspace(config.beta_start, config.beta_end, config.num_steps, dtype=np.float64)
        alpha_bar = np.cumprod(1.0 - betas)
        self.num_steps = config.num_steps
        self.betas = torch.tensor(betas, dtype=torch.float32)
        self.alpha_bar = torch.tensor(alpha_bar, dtype=torch.float32)
        self.alpha_bar_prev = torch.tensor(np.append(1.0, alpha_bar[:-1]), dtype=torch.float32)

    def to(self, device: torch.device | str) -> LinearNoiseSchedule:
        """Move the tables (kept in float32) to a device, in place, so lookups there copy nothing."""
        self.betas, self.alpha_bar, self.alpha_bar_prev = (
            v.to(device) for v in (self.betas, self.alpha_bar, self.alpha_bar_prev))
        return self

    # --- forward process -------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
        a = _per_sample(self.alpha_bar, t, x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    # --- one-step prediction ---------------------------------------------------------------------
    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample with the predicted noise: (x_t - sqrt(1 - a) eps) / sqrt(a)."""
        a = _per_sample(self.alpha_bar, t, x_t)
        return (x_t - (1.0 - a).sqrt() * eps) / a.sqrt()

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
        """The noise that takes x0 to x_t at step t."""
        a = _per_sample(self.alpha_bar, t, x_t)
        return (x_t - a.sqrt() * x0) / (1.0 - a).sqrt()

    def guidance_weight(self, t_s: torch.Tensor | int, w: float, like: torch.Tensor) -> torch.Tensor:
        """lambda = w (1 - alpha_bar_{t_s}): how far the guided result moves toward x0_l."""
        return w * (1.0 - _per_sample(self.alpha_bar, t_s, like))

    def guided_x0(self, x0_s: torch.Tensor, x0_l: torch.Tensor, t_s: torch.Tensor | int, w: float,
                  clip: Bounds = (-1.0, 1.0)) -> torch.Tensor:
        """Norm-guided one-step reconstruction, blend form: clip((1 - lambda) x0_s + lambda x0_l).

        x0_l is the (clipped) one-step prediction from the large step t_l: it has lost the anomaly
        but also detail; x0_s from the small step t_s keeps detail but may keep the anomaly too.
        `clip` is the valid pixel range in the model's units ([-1, 1], or per channel once standardised).
        """
        lam = self.guidance_weight(t_s, w, x0_s)
        return clamp((1.0 - lam) * x0_s + lam * x0_l, clip)

    def guided_eps(
        self, x_ts: torch.Tensor, eps_s: torch.Tensor, x0_l: torch.Tensor, t_s: torch.Tensor | int, w: float
    ) -> torch.Tensor:
        """The same rule as classifier-style guidance of the noise prediction (the paper's form).

        eps_hat = eps_s - sqrt(1 - a) * grad log p, with log p = -w/2 ||x_ts - x_tilde||^2 where
        x_tilde = sqrt(a) x0_l + sqrt(1 - a) eps_s is x0_l carried to step t_s with the predicted
        noise. predict_x0(x_ts, t_s, eps_hat) then equals the blend form before clipping.
        """
        a = _per_sample(self.alpha_bar, t_s, x_ts)
        x_tilde = a.sqrt() * x0_l + (1.0 - a).sqrt() * eps_s
        grad_log_p = w * (x_tilde - x_ts)
        return eps_s - (1.0 - a).sqrt() * grad_log_p

    # --- iterative reconstruction (for comparison with one step) ---------------------------------
    def ddim_timesteps(self, t_start: int, num_steps: int) -> list[int]:
        """num_steps evenly spaced timesteps from t_start down to 0 (inclusive)."""
        ts = np.linspace(t_start, 0, num_steps).round().astype(int)
        return sorted(set(ts.tolist()), reverse=True)

    def ddim_step(self, x_t: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor,
                  clip: Bounds = (-1.0, 1.0)) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from t to t_prev; t_prev = -1 returns the clean estimate."""
        x0 = clamp(self.predict_x0(x_t, t, eps), clip)
        if t_prev < 0:
            return x0
        eps = self.predict_eps(x_t, t, x0)
        a_prev = float(self.alpha_bar[t_prev])
        return a_prev**0.5 * x0 + (1.0 - a_prev) ** 0.5 * eps

    def ancestral_step(self, x_t: torch.Tensor, t: int, eps: torch.Tensor, noise: torch.Tensor,
                       clip: Bounds = (-1.0, 1.0)) -> torch.Tensor:
        """One DDPM step: sample x_{t-1} from the posterior q(x_{t-1} | x_t, x0_hat)."""
        x0 = clamp(self.predict_x0(x_t, t, eps), clip)
        if t == 0:
            return x0
        a, a_prev, beta = float(self.alpha_bar[t]), float(self.alpha_bar_prev[t]), float(self.betas[t])
        mean = (a_prev**0.5 * beta / (1.0 - a)) * x0 + ((1.0 - beta) ** 0.5 * (1.0 - a_prev) / (1.0 - a)) * x_t
        variance = beta * (1.0 - a_prev) / (1.0 - a)
        return mean + variance**0.5 * noise


def cosine_alpha_bar(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """alpha_bar[t] of the cosine schedule (Nichol & Dhariwal; guided-diffusion's "squaredcos_cap_v2") in
    num_steps steps, betas capped at max_beta: the short schedule DeCo-Diff trains with (10 steps)."""
    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(np.cumprod(1.0 - np.array(betas, dtype=np.float64)), dtype=torch.float32)
