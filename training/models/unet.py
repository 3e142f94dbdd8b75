"""DDPM U-Net: maps (x_t, t) to the noise epsilon. Nothing else lives here.

Four down and four up stages of DoubleConv blocks with skip connections and a
sinusoidal time embedding passed through an MLP with SiLU. The diffusion
arithmetic (schedule, q_sample, reverse steps, purification) is in
``training.diffusion`` and takes this network as an argument.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``t [N]`` -> ``[N, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], 1)


def _groups(ch: int) -> int:
    return math.gcd(ch, 8)


class DoubleConv(nn.Module):
    """conv3x3 -> GroupNorm -> GELU -> conv3x3 -> GroupNorm, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, residual: bool = False):
        super().__init__()
        self.residual = residual and cin == cout
        self.net = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(cout), cout),
            nn.GELU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(cout), cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.net(x)) if self.residual else self.net(x)


class Down(nn.Module):
    """Halve the resolution, two DoubleConvs, add the projected time embedding."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cin, residual=True), DoubleConv(cin, cout))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.emb(emb)[:, :, None, None]


class Up(nn.Module):
    """Double the resolution, concatenate the skip, two DoubleConvs, add the time embedding."""

    def __init__(self, cin: int, cskip: int, cout: int, emb_dim: int):
        super().__init__()
        self.conv = nn.Sequential(DoubleConv(cin + cskip, cin + cskip, residual=True), DoubleConv(cin + cskip, cout))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, x], 1)) + self.emb(emb)[:, :, None, None]


class UNet(nn.Module):
    """``forward(x_t, t)``: ``x_t [N, 1, H, W]`` (diffusion space, about [-1, 1]), ``t [N]`` int -> eps ``[N, 1, H, W]``.

    Channels per level: ``base * mults[i]``; H and W must be divisible by 16.
    """

    def __init__(self, base_channels: int = 64, channel_mults: tuple[int, ...] = (1, 2, 4, 4), time_dim: int = 256):
        super().__init__()
        if len(channel_mults) != 4:
            raise ValueError("the U-Net has four down and four up stages: give four channel multipliers")
        self.time_dim = time_dim
        chans = [base_channels] + [base_channels * m for m in channel_mults]  # input level + 4 down levels
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.inc = DoubleConv(1, chans[0])
        self.downs = nn.ModuleList(Down(chans[i], chans[i + 1], time_dim) for i in range(4))
        self.mid = nn.Sequential(DoubleConv(chans[4], chans[4], residual=True), DoubleConv(chans[4], chans[4], residual=True))
        self.ups = nn.ModuleList(Up(chans[i + 1], chans[i], chans[i], time_dim) for i in reversed(range(4)))
        self.out = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))
        h = self.inc(x)
        skips = [h]
        for down in self.downs:
            h = down(h, emb)
            skips.append(h)
        h = self.mid(skips.pop())
        for up in self.ups:
            h = up(h, skips.pop(), emb)
        return self.out(h)
