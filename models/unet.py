"""The reconstruction network: a denoising UNet that predicts the noise added to an image.

Guided-diffusion style: residual blocks conditioned on a sinusoidal time embedding, GroupNorm + SiLU,
multi-head self-attention at the low resolutions, skip connections between the two halves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    in_channels: int = 3
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_heads: int = 4
    dropout: float = 0.0
    image_size: int = 256
    num_classes: int = 0    # > 0: a class embedding added to the time embedding (one model, many categories)
    # The embedding as scale and shift after the block's second GroupNorm (guided-diffusion's
    # use_scale_shift_norm). Added before it, as by default, a per-channel bias is erased wherever the norm
    # has one channel per group (every level of the narrow presets): the network would not see t or class.
    scale_shift_norm: bool = False


def group_norm(channels: int) -> nn.GroupNorm:
    """32 groups where the width allows it; narrow test models fall back to fewer."""
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, scale_shift: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Zero-init the last conv so every block starts as the identity: deep UNets train stably.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [n, heads, hw, c/heads]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(n, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """A residual block, optionally followed by attention: one step of either half of the UNet."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, attention: bool, heads: int,
                 scale_shift: bool = False):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout, scale_shift)
        self.attn = AttentionBlock(out_ch, heads) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """eps_theta(x_t, t): [N, C, H, W] noisy images and [N] timesteps -> [N, C, H, W] predicted noise."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        levels = len(cfg.channel_mults)
        if cfg.image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {cfg.image_size} must be divisible by 2**{levels - 1} for {levels} levels")
        base, emb_dim = cfg.base_channels, 4 * cfg.base_channels
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # guided-diffusion's class conditioning; only built when asked for, so older model files still load
        self.class_embed = nn.Embedding(cfg.num_classes, emb_dim) if cfg.num_classes > 0 else None
        self.conv_in = nn.Conv2d(cfg.in_channels, base, 3, padding=1)

        def attend(resolution: int) -> bool:
            return resolution in cfg.attention_resolutions

        # Encoder: remember the width of every skip connection it emits.
        self.down = nn.ModuleList()
        skip_widths, ch, res = [base], base, cfg.image_size
        for i, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Level(ch, base * mult, emb_dim, cfg.dropout, attend(res), cfg.num_heads,
                                         cfg.scale_shift_norm))
                ch = base * mult
                skip_widths.append(ch)
            if i < levels - 1:
                self.down.append(Downsample(ch))
                skip_widths.append(ch)
                res //= 2

        self.middle = nn.ModuleList([
            Level(ch, ch, emb_dim, cfg.dropout, True, cfg.num_heads, cfg.scale_shift_norm),
            Level(ch, ch, emb_dim, cfg.dropout, False, cfg.num_heads, cfg.scale_shift_norm),
        ])

        # Decoder: one more block per level than the encoder, each taking one skip connection.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                skip = skip_widths.pop()
                self.up.append(Level(ch + skip, base * mult, emb_dim, cfg.dropout, attend(res), cfg.num_heads,
                                         cfg.scale_shift_norm))
                ch = base * mult
            if i > 0:
                self.up.append(Upsample(ch))
                res *= 2

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels).to(x.dtype))
        if self.class_embed is not None:
            if classes is None:
                raise ValueError("this UNet is class-conditional: give each image's class index")
            emb = emb + self.class_embed(classes)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, Level) else layer(h)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, Level):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.out(h)
