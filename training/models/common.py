"""Small pieces shared by the models."""

from __future__ import annotations

import torch
from torch import nn

# Grey-level statistics of preprocessed brain MRI (crop to head, [0, 1]); the
# exact values only condition the optimisation, they are not a data contract.
PIXEL_MEAN = 0.25
PIXEL_STD = 0.30


class Normalize(nn.Module):
    """Affine normalisation inside the graph, so every model's input stays in [0, 1] pixel space."""

    def __init__(self, mean: float = PIXEL_MEAN, std: float = PIXEL_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
