"""The three exported graphs, as small PyTorch modules with fixed inputs and outputs.

- :class:`ClassifierGraph`: ``image [N, 1, S, S]`` in [0, 1] -> ``probs [N, C]``
  (the site's mixture of experts, softmax inside).
- the detector graph, ``image`` -> ``score [N]`` (:func:`detector_graph`
  picks it from the profile's ``defense.score``):
  :class:`NoiseFloorGraph`, the mean of the lowest fraction of the scan's
  absolute Laplacian values (a convolution and a TopK), or
  :class:`DetectorGraph`, the MAE's mean squared reconstruction error over
  the fixed complementary masks, each patch counted once. Its masks are
  constants of the graph: the visible and restore indices of every mask are
  precomputed, so the graph has no data-dependent shapes.
- :class:`DenoiserGraph`: ``x_t [N, 1, S, S]`` (diffusion space, [-1, 1]) and
  ``t [N]`` (float, the integer timestep) -> ``eps [N, 1, S, S]``. The runtime
  runs the respaced reverse process around it with the bundle's schedule.

Each is numerically the same computation as the training code (tests compare
them in PyTorch before any ONNX is involved).
"""

from __future__ import annotations

import torch
from torch import nn

from training.config import Profile
from training.defense import noise_floor
from training.models.mae import MaskedAutoencoder, complementary_masks


class ClassifierGraph(nn.Module):
    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(image).softmax(1)


class DetectorGraph(nn.Module):
    """Deterministic detection score with the masks baked in as index constants."""

    def __init__(self, mae: MaskedAutoencoder, mask_ratio: float, mask_seed: int):
        super().__init__()
        self.mae = mae
        masks, responsible = complementary_masks(mae.num_patches, mask_ratio, mask_seed)
        keeps, restores = [], []
        for m in masks:
            order = torch.argsort(m.to(torch.int8), stable=True)
            n_visible = mae.num_patches - int(m.sum())
            keeps.append(order[:n_visible])
            restores.append(torch.argsort(order))
        self.n_masks = len(masks)
        for i in range(self.n_masks):
            self.register_buffer(f"keep{i}", keeps[i], persistent=False)
            self.register_buffer(f"restore{i}", restores[i], persistent=False)
            self.register_buffer(f"resp{i}", responsible[i].float(), persistent=False)

    def _reconstruct(self, tokens: torch.Tensor, keep: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        m = self.mae
        n = tokens.shape[0]
        visible = tokens.index_select(1, keep)
        cls = m.cls_token.expand(n, -1, -1)
        latent = m.enc_norm(m.encoder(torch.cat([cls, visible], 1)))
        h = m.dec_embed(latent)
        fill = m.mask_token.expand(n, m.num_patches - keep.shape[0], -1)
        h_ = torch.cat([h[:, 1:], fill], 1).index_select(1, restore)
        h = torch.cat([h[:, :1], h_], 1) + torch.cat([torch.zeros_like(m.dec_pos[:, :1]), m.dec_pos], 1)
        return m.dec_pred(m.dec_norm(m.decoder(h))[:, 1:])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        m = self.mae
        tokens = m.patch_embed(m.normalize(image)).flatten(2).transpose(1, 2) + m.enc_pos
        target = m.patchify(image)
        total = image.new_zeros(image.shape[0])
        for i in range(self.n_masks):
            pred = self._reconstruct(tokens, getattr(self, f"keep{i}"), getattr(self, f"restore{i}"))
            err = (pred - target).pow(2).mean(-1)
            total = total + (err * getattr(self, f"resp{i}")).sum(1)
        return total / m.num_patches


class NoiseFloorGraph(nn.Module):
    def __init__(self, fraction: float):
        super().__init__()
        self.fraction = float(fraction)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return noise_floor(image, self.fraction)


def detector_graph(detector: MaskedAutoencoder | None, profile: Profile) -> nn.Module:
    """The graph of the profile's detection score."""
    if profile.defense.score == "floor":
        return NoiseFloorGraph(profile.defense.floor_fraction)
    return DetectorGraph(detector, profile.detector.mask_ratio, profile.detector.mask_seed)


def score_description(profile: Profile) -> str:
    if profile.defense.score == "floor":
        return (f"noise floor: mean of the lowest {profile.defense.floor_fraction:g} of |Laplacian(image)| "
                "(3x3 kernel 0 1 0 / 1 -4 1 / 0 1 0, edges replicated)")
    return "MAE mean squared reconstruction error over complementary masks, each patch once"


class DenoiserGraph(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t)
