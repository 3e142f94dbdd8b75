"""Training augmentation on batches (the paper's): rotations, flips, brightness; optionally zoom, shifts and
Gaussian noise. Stays in [0, 1]."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class Augment:
    """Random rotation up to ``max_degrees``, horizontal flip with ``p_hflip``,
    vertical flip with ``p_vflip``, brightness scaled by a factor in
    [1 - brightness, 1 + brightness]. ``__call__(x [N, 1, H, W], generator)``.

    Beyond the paper's (all off by default, and then the draws are exactly the paper's): ``scale`` zooms by a
    factor in [1 - scale, 1 + scale], ``translate`` shifts by up to that fraction of the image's half-width in
    each direction, ``noise`` adds Gaussian noise of that standard deviation (pixel values in [0, 1]).
    """

    max_degrees: float = 15.0
    p_hflip: float = 0.5
    p_vflip: float = 0.0
    brightness: float = 0.1
    scale: float = 0.0
    translate: float = 0.0
    noise: float = 0.0

    def __post_init__(self):
        if not (0 <= self.max_degrees <= 180 and 0 <= self.p_hflip <= 1 and 0 <= self.p_vflip <= 1
                and 0 <= self.brightness < 1 and 0 <= self.scale < 1 and 0 <= self.translate <= 1 and self.noise >= 0):
            raise ValueError("augment: max_degrees in [0, 180], p_hflip / p_vflip / translate in [0, 1], "
                             "brightness / scale in [0, 1), noise >= 0")

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
        if self.scale > 0 or self.translate > 0:
            v = torch.rand(n, 3, generator=generator)
            theta[:, :, :2] /= (1.0 + (v[:, 0] * 2 - 1) * self.scale).view(-1, 1, 1)  # a zoom of s samples 1/s
            theta[:, :, 2] = (v[:, 1:] * 2 - 1) * self.translate
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        gain = 1.0 + (u[:, 3] * 2 - 1) * self.brightness
        out = out * gain.to(x).view(-1, 1, 1, 1)
        if self.noise > 0:
            out = out + self.noise * torch.randn(out.shape, generator=generator).to(x)
        return out.clamp(0.0, 1.0)


def augmentation(profile, component: str) -> Augment:
    """The augmentation ``component`` trains with: the classifier's configured one
    (``classifier.augment_kwargs``), the paper's for the denoiser and detector (whose targets are the scans
    themselves: noise added to them would be learnt)."""
    return profile.classifier.make_augment() if component == "classifier" else Augment()
