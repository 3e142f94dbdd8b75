"""The defense at the scanner, in PyTorch: detect -> purify the flagged scans -> classify.

This is the reference the exported runtime must match. It takes images only:
no label can reach it (PROTOCOL.md rule 1; a test checks the signature).

- **Detection score** s(x): the MAE's mean reconstruction error over the
  fixed complementary masks (every patch reconstructed once).
- **Threshold** tau: the (1 - flag_rate) quantile of s on clean validation
  scans (:func:`calibrate_tau`), fixed before any attack is seen.
- **Score -> t\\***: linear from ``t_min`` at s = tau to ``t_max`` at
  s = ``ref_ratio`` * tau, clamped; rounded to a multiple of ``quantum`` so
  that flagged scans of a batch share a few t\\* values and run together.
- **Purification**: ``steps`` DDIM steps on a respacing of the schedule from
  t\\* (or every DDPM step when ``steps`` is None); noise from a generator.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.config import DefenseConfig
from training.diffusion import GaussianDiffusion, purify
from training.models.mae import complementary_masks


def calibrate_tau(clean_scores: np.ndarray, flag_rate: float) -> float:
    """Threshold that flags ``flag_rate`` of the given clean (validation) scores."""
    clean_scores = np.asarray(clean_scores, dtype=np.float64)
    if clean_scores.size == 0:
        raise ValueError("cannot calibrate tau on zero clean scans")
    return float(np.quantile(clean_scores, 1.0 - flag_rate))


def kappa_flags(scores: torch.Tensor, kappa: float) -> torch.Tensor:
    """The paper's rank rule: flag the ceil(kappa * N) highest scores of the batch (batch-dependent)."""
    n = int(np.ceil(kappa * scores.numel()))
    flags = torch.zeros_like(scores, dtype=torch.bool)
    if n > 0:
        flags[scores.topk(n).indices] = True
    return flags


def t_star_of(scores: torch.Tensor, tau: float, cfg: DefenseConfig) -> torch.Tensor:
    """Integer t* per score (only meaningful for flagged scores, s > tau)."""
    frac = ((scores - tau) / (tau * (cfg.ref_ratio - 1.0))).clamp(0.0, 1.0)
    t = cfg.t_min + frac * (cfg.t_max - cfg.t_min)
    t = (t / cfg.quantum).round() * cfg.quantum
    return t.clamp(cfg.t_min, cfg.t_max).long()


class DefensePipeline(nn.Module):
    """``forward(x)`` -> probabilities ``[N, C]``; :meth:`run` also returns scores, flags and t*."""

    def __init__(self, classifier: nn.Module, detector: nn.Module, denoiser: nn.Module,
                 diffusion: GaussianDiffusion, tau: float, cfg: DefenseConfig | None = None,
                 mask_ratio: float = 0.75, mask_seed: int = 1234):
        super().__init__()
        self.classifier, self.detector, self.denoiser = classifier, detector, denoiser
        self.diffusion, self.tau, self.cfg = diffusion, float(tau), cfg or DefenseConfig()
        masks, resp = complementary_masks(detector.num_patches, mask_ratio, mask_seed)
        self.register_buffer("masks", masks, persistent=False)
        self.register_buffer("responsible", resp, persistent=False)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.detector.score(x, self.masks, self.responsible)

    def purify_flagged(self, x: torch.Tensor, flagged: torch.Tensor, t_star: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        out = x.clone()
        for t in torch.unique(t_star[flagged]).tolist():
            idx = (flagged & (t_star == t)).nonzero().flatten()
            noise = torch.randn(x[idx].shape, generator=generator, dtype=x.dtype).to(x.device)
            purified = purify(self.denoiser, self.diffusion, x[idx], int(t), self.cfg.steps or None, noise, generator)
            out = out.index_copy(0, idx, purified)
        return out

    def run(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        scores = self.score(x)
        flagged = kappa_flags(scores, self.cfg.kappa) if self.cfg.rule == "kappa" else scores > self.tau
        t_star = torch.where(flagged, t_star_of(scores, self.tau, self.cfg), torch.zeros_like(scores, dtype=torch.long))
        x_in = self.purify_flagged(x, flagged, t_star, generator) if bool(flagged.any()) else x
        probs = self.classifier(x_in).softmax(1)
        return {"probs": probs, "scores": scores, "flagged": flagged, "t_star": t_star}

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.run(x, generator)["probs"]


@torch.no_grad()
def run_batched(pipe: DefensePipeline, images: np.ndarray | torch.Tensor, batch_size: int = 32,
                seed: int = 0) -> dict[str, np.ndarray]:
    """The pipeline over in-memory images ``[N, H, W]`` or ``[N, 1, H, W]``; numpy outputs."""
    pipe.eval()
    x = torch.as_tensor(images).float()
    if x.dim() == 3:
        x = x[:, None]
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list] = {}
    for i in range(0, len(x), batch_size):
        for k, v in pipe.run(x[i : i + batch_size], g).items():
            parts.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}
