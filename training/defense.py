"""The defense at the scanner, in PyTorch: detect -> purify the flagged scans -> classify.

This is the reference the exported runtime must match. It takes images only:
no label can reach it (PROTOCOL.md rule 1; a test checks the signature).

- **Detection score** s(x) (:class:`DetectionScore`, ``cfg.score``):
  ``"floor"``, the scan's noise floor -- the mean of the lowest
  ``floor_fraction`` of its absolute discrete-Laplacian values
  (:func:`noise_floor`): PGD adds dense +-eps texture, which roughens the
  flattest regions of a scan (background, ventricles) far above their clean
  level; or ``"mae"``, the paper's score, the MAE's mean reconstruction error
  over the fixed complementary masks (every patch reconstructed once). The
  choice and its measurements are in docs/detection.md.
- **Threshold** tau: the (1 - flag_rate) quantile of s on clean validation
  scans (:func:`calibrate_tau`), fixed before any attack is seen.
- **Score -> t\\***: linear from ``t_min`` at s = tau to ``t_max`` at
  s = ``ref_ratio`` * tau, clamped; rounded to a multiple of ``quantum`` so
  that flagged scans of a batch share a few t\\* values and run together.
- **Purification**: ``steps`` DDIM steps on a respacing of the schedule from
  t\\* (or every DDPM step when ``steps`` is None); noise from a generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
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


LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def abs_laplacian(x: torch.Tensor) -> torch.Tensor:
    """``|Laplacian(x)|`` per pixel ``[N, 1, H, W]``, edges replicated."""
    kernel = x.new_tensor(LAPLACIAN).view(1, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel).abs()


def noise_floor(x: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Mean of the lowest ``fraction`` of ``|Laplacian(x)|`` per scan ``[N]`` (x ``[N, 1, H, W]``).

    Edges are replicated, so a flat border contributes zeros. Differentiable
    (through ``topk``), so an adaptive attacker can aim to keep it low.
    """
    lap = abs_laplacian(x).flatten(1)
    k = max(1, math.ceil(fraction * lap.shape[1]))
    return lap.topk(k, dim=1, largest=False).values.mean(1)


class DetectionScore(nn.Module):
    """The detection score ``x [N, 1, H, W] -> [N]`` chosen by ``cfg.score`` (larger = more suspicious)."""

    def __init__(self, detector: nn.Module | None, cfg: DefenseConfig, mask_ratio: float = 0.75, mask_seed: int = 1234):
        super().__init__()
        self.kind, self.fraction = cfg.score, cfg.floor_fraction
        self.detector = detector if self.kind == "mae" else None
        if self.kind == "mae":
            if detector is None:
                raise ValueError("the 'mae' detection score needs a trained detector")
            masks, resp = complementary_masks(detector.num_patches, mask_ratio, mask_seed)
            self.register_buffer("masks", masks, persistent=False)
            self.register_buffer("responsible", resp, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "floor":
            return noise_floor(x, self.fraction)
        return self.detector.score(x, self.masks, self.responsible)


@torch.no_grad()
def detection_scores(detector: nn.Module | None, images: np.ndarray, cfg: DefenseConfig, mask_ratio: float = 0.75,
                     mask_seed: int = 1234, batch_size: int = 64) -> np.ndarray:
    """Scores ``[N]`` of in-memory images ``[N, H, W]`` (e.g. clean validation scans, for calibration)."""
    scorer = DetectionScore(detector, cfg, mask_ratio, mask_seed).eval()
    x = torch.as_tensor(np.asarray(images)).float()
    if x.dim() == 3:
        x = x[:, None]
    return torch.cat([scorer(x[i : i + batch_size]) for i in range(0, len(x), batch_size)] or [x.new_zeros(0)]).numpy()


def kappa_flags(scores: torch.Tensor, kappa: float) -> torch.Tensor:
    """The paper's rank rule: flag the ceil(kappa * N) highest scores of the batch (batch-dependent)."""
    n = int(np.ceil(kappa * scores.numel()))
    flags = torch.zeros_like(scores, dtype=torch.bool)
    if n > 0:
        flags[scores.topk(n).indices] = True
    return flags


def t_star_of(scores: torch.Tensor, tau: float, cfg: DefenseConfig) -> torch.Tensor:
    """Integer t* per score (only meaningful for flagged scores, s > tau)."""
    frac = ((scores - tau) / max(tau * (cfg.ref_ratio - 1.0), 1e-12)).clamp(0.0, 1.0)
    t = cfg.t_min + frac * (cfg.t_max - cfg.t_min)
    t = (t / cfg.quantum).round() * cfg.quantum
    return t.clamp(cfg.t_min, cfg.t_max).long()


class TorchNoise:
    """Forward noise from a torch generator, drawn per group of scans in the order they are purified."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype).to(like.device)


class ScanSeedNoise:
    """Forward noise of scan ``i`` from ``numpy.random.default_rng(seeds[i])``: the scanner runtime's noise.

    With it the PyTorch pipeline draws exactly the noise ``runtime.pipeline``
    draws for the same seeds (DDIM purification, whose only randomness is the
    forward noise), whatever the batch.
    """

    def __init__(self, seeds):
        self.seeds = np.asarray(seeds, np.int64)

    def __call__(self, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        shape = tuple(like.shape[1:])
        arr = np.stack([np.random.default_rng(int(self.seeds[i])).standard_normal(shape) for i in idx.tolist()])
        return torch.from_numpy(arr.astype(np.float32)).to(like.device, like.dtype)


class DefensePipeline(nn.Module):
    """``forward(x)`` -> probabilities ``[N, C]``; :meth:`run` also returns scores, flags and t*.

    The one place where score -> flag -> t* -> purify -> classify is
    written on the PyTorch side (training's purifying objective, the
    evaluation, the adaptive attack and the runtime comparison all call it);
    ``runtime.pipeline.Pipeline`` is its numpy twin, tested against it. The
    purification noise is injected: a torch generator, or any
    ``noise(idx, like) -> tensor`` such as :class:`ScanSeedNoise`.
    """

    def __init__(self, classifier: nn.Module, detector: nn.Module, denoiser: nn.Module,
                 diffusion: GaussianDiffusion, tau: float, cfg: DefenseConfig | None = None,
                 mask_ratio: float = 0.75, mask_seed: int = 1234):
        super().__init__()
        self.classifier, self.detector, self.denoiser = classifier, detector, denoiser
        self.diffusion, self.tau, self.cfg = diffusion, float(tau), cfg or DefenseConfig()
        self.scorer = DetectionScore(detector, self.cfg, mask_ratio, mask_seed)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.scorer(x)

    def decide(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flagged ``[N]`` bool, t* ``[N]`` long, 0 where not flagged) from detection scores."""
        if self.cfg.mode == "always":  # purify every scan; t* from its score, at least t_min
            flagged = torch.ones_like(scores, dtype=torch.bool)
        else:
            flagged = kappa_flags(scores, self.cfg.kappa) if self.cfg.rule == "kappa" else scores > self.tau
        t_star = torch.where(flagged, t_star_of(scores, self.tau, self.cfg), torch.zeros_like(scores, dtype=torch.long))
        return flagged, t_star

    def purify_flagged(self, x: torch.Tensor, flagged: torch.Tensor, t_star: torch.Tensor,
                       generator=None, steps: int | None | str = "config") -> torch.Tensor:
        """``x`` with each flagged scan purified from its own t*; differentiable.

        ``generator``: a torch generator or a noise source (see the class
        docstring); ``steps`` overrides the configured purification steps.
        """
        noise_of = generator if callable(generator) else TorchNoise(generator)
        torch_gen = generator if isinstance(generator, torch.Generator) else None
        steps = (self.cfg.steps or None) if steps == "config" else steps
        out = x.clone()
        for t in torch.unique(t_star[flagged]).tolist():
            idx = (flagged & (t_star == t)).nonzero().flatten()
            noise = noise_of(idx, x[idx])
            purified = purify(self.denoiser, self.diffusion, x[idx], int(t), steps, noise, torch_gen)
            out = out.index_copy(0, idx, purified)
        return out

    def purified_inputs(self, x: torch.Tensor, generator=None) -> dict[str, torch.Tensor]:
        """What the classifier sees: ``x_in``, with ``scores``, ``flagged`` and ``t_star``."""
        scores = self.score(x)
        flagged, t_star = self.decide(scores)
        x_in = self.purify_flagged(x, flagged, t_star, generator) if bool(flagged.any()) else x
        return {"x_in": x_in, "scores": scores, "flagged": flagged, "t_star": t_star}

    def run(self, x: torch.Tensor, generator=None) -> dict[str, torch.Tensor]:
        """Probabilities, scores, flags and t*; with ``cfg.draws`` > 1 a flagged scan's probabilities are the
        mean over that many purifications (each with its own noise from ``generator``)."""
        r = self.purified_inputs(x, generator)
        probs = self.classifier(r.pop("x_in")).softmax(1)
        flagged = r["flagged"]
        if self.cfg.draws > 1 and bool(flagged.any()):
            total = probs[flagged]
            for _ in range(self.cfg.draws - 1):
                xp = self.purify_flagged(x, flagged, r["t_star"], generator)
                total = total + self.classifier(xp[flagged]).softmax(1)
            probs = probs.clone()
            probs[flagged] = total / self.cfg.draws
        return {"probs": probs, **r}

    def forward(self, x: torch.Tensor, generator=None) -> torch.Tensor:
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
