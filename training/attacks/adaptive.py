"""Adaptive white-box PGD on the whole defense (PROTOCOL.md, threat model "adaptive").

The defense is ``detect -> purify if s(x) > tau -> classify``. Its branch and
its purification noise are what a non-adaptive attack ignores. This attack
maximises, per scan, a differentiable surrogate of the pipeline's loss:

    L(x) = (1 - p(x)) * CE(f(x), y)                      # not flagged: the classifier sees x
         + p(x) * mean_e CE(f(purify_e(x)), y)           # flagged: it sees a purified x (EOT over noise)
         - lambda * relu(s(x) - tau) / tau                # and stay under the threshold if possible

with p(x) = sigmoid((s(x) - tau) / (temperature * tau)). Gradients flow
through the detector score, the purification and the classifier:

- ``gradient="exact"``: through a short respaced purification
  (``attack_purify_steps`` DDIM steps from the scan's t*), the denoiser
  differentiated at every step;
- ``gradient="bpda"``: the purification is taken as the identity on the
  backward pass (Athalye et al. 2018), its forward pass is the real one.

``objective="under_tau"`` is the attacker who wants no purification at all:
it maximises the classifier's loss on x itself while a heavy penalty
``detector_weight * relu(s(x) - tau_margin * tau) / tau`` keeps the score
just under the threshold. ``lowfreq=F`` perturbs through a delta of
``1/F`` the resolution, upsampled bilinearly: a smooth change that a
Laplacian barely sees (L-inf only: an upsampled L-inf ball stays inside it).
When the defense purifies every scan (``mode = "always"``) the surrogate's
flag probability is 1.

``support="textured"`` is the attacker who knows the noise-floor score
(``defense.score = "floor"``): it leaves the flattest ``flat_fraction`` of
each scan's pixels, and their neighbours, untouched (no random start there
either), so the flat regions the score measures stay as clean as they were.

Every iterate is projected to the eps-ball and clamped to [0, 1]. The
returned scans are then scored on the real pipeline (its own steps, fresh
noise), never on the surrogate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch.nn import functional as F

from training.attacks.pgd import project, random_start
from training.config import AttackConfig
from training.defense import DefensePipeline, abs_laplacian, t_star_of


@dataclass(frozen=True)
class AdaptiveConfig:
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(steps=20))
    eot: int = 4
    gradient: str = "exact"  # "exact" | "bpda"
    attack_purify_steps: int = 2
    detector_weight: float = 1.0
    temperature: float = 0.05
    support: str = "all"  # "all" | "textured"
    flat_fraction: float = 0.2
    objective: str = "pipeline"  # "pipeline" | "under_tau"
    tau_margin: float = 0.9
    lowfreq: int = 0  # 0: full resolution; F: a delta of 1/F the resolution, upsampled
    restarts: int = 1  # per scan, the restart the real pipeline gets wrong (else the last) is kept

    def __post_init__(self):
        if self.objective not in ("pipeline", "under_tau"):
            raise ValueError(f"objective must be 'pipeline' or 'under_tau', got {self.objective!r}")
        if self.lowfreq < 0 or (self.lowfreq > 1 and self.attack.norm != "linf"):
            raise ValueError("lowfreq must be >= 0 and needs the L-inf norm")
        if self.restarts < 1 or not 0.0 < self.tau_margin <= 1.0:
            raise ValueError("restarts must be >= 1 and tau_margin in (0, 1]")
        if self.gradient not in ("exact", "bpda"):
            raise ValueError(f"gradient must be 'exact' or 'bpda', got {self.gradient!r}")
        if self.support not in ("all", "textured"):
            raise ValueError(f"support must be 'all' or 'textured', got {self.support!r}")
        if not 0.0 <= self.flat_fraction < 1.0:
            raise ValueError(f"flat_fraction must be in [0, 1), got {self.flat_fraction}")
        if self.eot < 1 or self.attack_purify_steps < 1:
            raise ValueError("eot and attack_purify_steps must be >= 1")

    def describe(self) -> str:
        return (f"adaptive {self.attack.describe()}, EOT {self.eot}, gradient {self.gradient} "
                f"({self.attack_purify_steps} DDIM steps in the attack), detector term weight {self.detector_weight}, "
                f"temperature {self.temperature}"
                + (f", perturbing only outside the flattest {self.flat_fraction:g} of pixels" if self.support == "textured" else "")
                + (f", staying under {self.tau_margin:g} tau" if self.objective == "under_tau" else "")
                + (f", delta at 1/{self.lowfreq} resolution upsampled" if self.lowfreq > 1 else "")
                + (f", {self.restarts} restarts" if self.restarts > 1 else ""))

    def to_dict(self) -> dict:
        return asdict(self)


def _purified(pipe: DefensePipeline, x: torch.Tensor, t_star: torch.Tensor, steps: int, gradient: str,
              generator: torch.Generator | None) -> torch.Tensor:
    """Every scan purified from its own t*, differentiably (exact) or with an identity backward (BPDA)."""
    every = torch.ones(len(x), dtype=torch.bool, device=x.device)
    if gradient == "exact":
        return pipe.purify_flagged(x, every, t_star, generator, steps=steps)
    with torch.no_grad():
        purified = pipe.purify_flagged(x, every, t_star, generator, steps=steps)
    return x + (purified - x).detach()


def flag_probability(pipe: DefensePipeline, s: torch.Tensor, temperature: float) -> torch.Tensor:
    """Smoothed flag decision ``[N]`` for scores ``s``: 1 where the defense purifies every scan."""
    if pipe.cfg.mode == "always":
        return torch.ones_like(s)
    return torch.sigmoid((s - pipe.tau) / (temperature * pipe.tau))


def surrogate_loss(pipe: DefensePipeline, x: torch.Tensor, y: torch.Tensor, cfg: AdaptiveConfig,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Per-scan surrogate of the pipeline's loss (see the module docstring)."""
    s = pipe.score(x)
    tau = pipe.tau
    direct = F.cross_entropy(pipe.classifier(x), y, reduction="none")
    if cfg.objective == "under_tau":
        return direct - cfg.detector_weight * F.relu(s - cfg.tau_margin * tau) / tau
    p = flag_probability(pipe, s, cfg.temperature)
    t_star = t_star_of(s.detach().clamp_min(tau), tau, pipe.cfg)
    purified = 0.0
    for _ in range(cfg.eot):
        xp = _purified(pipe, x, t_star, cfg.attack_purify_steps, cfg.gradient, generator)
        purified = purified + F.cross_entropy(pipe.classifier(xp), y, reduction="none") / cfg.eot
    return (1 - p) * direct + p * purified - cfg.detector_weight * F.relu(s - tau) / tau


def textured_support(x: torch.Tensor, flat_fraction: float) -> torch.Tensor:
    """``[N, 1, H, W]`` 1 where an attacker may perturb: outside the flattest pixels and their 8 neighbours."""
    if flat_fraction <= 0:
        return torch.ones_like(x)
    lap = abs_laplacian(x)
    k = max(1, int(flat_fraction * lap[0].numel()))
    kth = lap.flatten(1).kthvalue(k, dim=1).values.view(-1, 1, 1, 1)
    flat = (lap <= kth).to(x.dtype)
    return 1.0 - F.max_pool2d(flat, 3, stride=1, padding=1)


def _upsample(d: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(d, size=size, mode="bilinear", align_corners=False)


def _clamp_through(v: torch.Tensor) -> torch.Tensor:
    """``v`` clamped to [0, 1] in value, the identity for the gradient (a pixel at 0 or 1 can still move back)."""
    return v + (v.clamp(0.0, 1.0) - v).detach()


def _one_run(pipe: DefensePipeline, x: torch.Tensor, y: torch.Tensor, cfg: AdaptiveConfig, support: torch.Tensor,
             generator: torch.Generator | None) -> torch.Tensor:
    """One PGD run from a random start (or zero) on the surrogate loss."""
    a = cfg.attack
    size = x.shape[-2:]
    if cfg.lowfreq > 1:  # optimise a coarse delta; its bilinear upsampling stays in the L-inf ball
        coarse = x[:, :, :: cfg.lowfreq, :: cfg.lowfreq]
        d = random_start(coarse, a, generator) if a.random_start else torch.zeros_like(coarse)

        def adv_of(d):
            return _clamp_through(x + _upsample(d, size) * support)
    else:
        d = project(random_start(x, a, generator) * support, a.norm, a.eps) if a.random_start else torch.zeros_like(x)

        def adv_of(d):
            return _clamp_through(x + d)
    for _ in range(a.steps):
        d.requires_grad_(True)
        loss = surrogate_loss(pipe, adv_of(d), y, cfg, generator).sum()
        (grad,) = torch.autograd.grad(loss, d)
        if cfg.lowfreq <= 1:
            grad = grad * support
        with torch.no_grad():
            if a.norm == "linf":
                d = d + a.step * grad.sign()
            else:
                d = d + a.step * grad / (grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)
            d = project(d, a.norm, a.eps)
            if cfg.lowfreq <= 1:
                d = (x + d * support).clamp(0.0, 1.0) - x
    return adv_of(d).detach()


def adaptive_pgd(pipe: DefensePipeline, x: torch.Tensor, y: torch.Tensor, cfg: AdaptiveConfig | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial scans against the whole pipeline (detached, in [0, 1]).

    With ``cfg.restarts`` > 1, each scan keeps the first restart whose result
    the real pipeline (one noise draw from ``generator``) gets wrong, else the
    last restart's.
    """
    cfg = cfg or AdaptiveConfig()
    pipe.eval()
    x = x.detach()
    support = textured_support(x, cfg.flat_fraction) if cfg.support == "textured" else torch.ones_like(x)
    best, done = None, torch.zeros(len(y), dtype=torch.bool, device=x.device)
    for r in range(cfg.restarts):
        adv = _one_run(pipe, x, y, cfg, support, generator)
        best = adv if best is None else torch.where(done.view(-1, 1, 1, 1), best, adv)
        if r + 1 < cfg.restarts:
            with torch.no_grad():
                done = done | (pipe(best, generator).argmax(1) != y)
    return best
