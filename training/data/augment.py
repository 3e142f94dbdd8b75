"""Training augmentation on batches (the paper's): rotations, flips, brightness. Stays in [0, 1]."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class Augment:
    """Random rotation up to ``max_degrees``, horizontal flip with ``p_hflip``,
    vertical flip with ``p_vflip``, brightness scaled by a factor in
    [1 - brightness, 1 + brightness]. ``__call__(x [N, 1, H, W], generator)``."""

    max_degrees: float = 15.0
    p_hflip: float = 0.5
    p_vflip: float = 0.0
    brightness: float = 0.1

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n = x.shape[0]
        u = torch.rand(n, 4, generator=generator)
        angle = (u[:, 0] * 2 - 1) * math.radians(self.max_degrees)
        sx = torch.where(u[:, 1] < self.p_hflip, -1.0, 1.0)
        sy = torch.where(u[:, 2] < self.p_vflip, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy
        theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * sy
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        gain = 1.0 + (u[:, 3] * 2 - 1) * self.brightness
        return (out * gain.to(x).view(-1, 1, 1, 1)).clamp(0.0, 1.0)
