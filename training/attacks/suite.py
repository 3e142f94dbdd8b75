"""The attack suite: every attack the defense must survive, scored on the real pipeline.

Each attack crafts adversarial scans at the PROTOCOL.md budgets (L-inf 0.015,
L2 0.1, in [0, 1] pixel space); the scans are then passed through the site's
real system (its own detection score, the real tau rule or the chosen mode,
fresh purification noise), never through the attack's surrogate.

Attacks (:data:`ATTACKS`):

- ``pgd-paper-linf`` / ``pgd-paper-l2``: the paper's PGD on the classifier.
- ``pgd-long-linf`` / ``pgd-long-l2``: PGD on the undefended classifier with
  ``long_steps`` small steps (2.5 eps / steps) and ``restarts`` restarts: the
  dense +-eps pattern of the paper's PGD is no longer there; transferred to
  the pipeline.
- ``apgd-ce`` / ``apgd-margin``: APGD (torchattacks) on the pipeline as a
  model (:class:`PipelineModel`): expected output over the flag decision and
  the purification noise, exact gradients through the one-step purifier, EOT
  ``eot`` draws per step. DLR needs a third-largest logit and is undefined for
  two classes; its two-class form is the logit margin, which ``apgd-margin``
  uses.
- ``adaptive``: detector-aware PGD on the pipeline (score term in the loss,
  every pixel); ``adaptive-under-tau``: maximise the classifier's loss while
  keeping the score under 0.9 tau (no purification wanted);
  ``adaptive-textured``: the flattest pixels left alone (the noise-floor
  score never moves); ``lowfreq``: a delta at 1/8 resolution, upsampled (a
  smooth change a Laplacian barely sees), on the pipeline's surrogate.
- ``transfer-site``: long PGD crafted on another site's classifier
  (federated runs).

Scoring, per scan: ``draws`` independent purifications (fresh noise each);
the single-draw figure is draw 0; ``worst_of_n`` counts a scan correct only
when every draw is; ``majority_of_n`` when more than half are (the DiffBreak
protocol). The suite's worst case counts a scan correct only when it survives
every attack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from training.attacks.adaptive import AdaptiveConfig, adaptive_pgd, flag_probability
from training.attacks.pgd import PAPER_L2, PAPER_LINF, pgd
from training.config import AttackConfig
from training.defense import DefensePipeline, t_star_of

ATTACKS = ("pgd-paper-linf", "pgd-paper-l2", "pgd-long-linf", "pgd-long-l2", "apgd-ce", "apgd-margin", "adaptive",
           "adaptive-under-tau", "adaptive-textured", "lowfreq", "transfer-site")
CHEAP = ("pgd-paper-linf", "pgd-paper-l2", "pgd-long-linf", "pgd-long-l2", "transfer-site")


@dataclass(frozen=True)
class SuiteConfig:
    eps_linf: float = 0.015
    eps_l2: float = 0.1
    long_steps: int = 100
    restarts: int = 2
    apgd_steps: int = 50
    eot: int = 20
    adaptive_steps: int = 50
    adaptive_eot: int = 4
    purify_steps: int = 0  # DDIM steps of the purification the attacks differentiate (0: the defense's own)
    draws: int = 10
    attacks: tuple[str, ...] = ATTACKS

    def __post_init__(self):
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad:
            raise ValueError(f"unknown attack(s) {bad}; choose from {ATTACKS}")
        if min(self.long_steps, self.restarts, self.apgd_steps, self.eot, self.adaptive_steps, self.adaptive_eot,
               self.draws) < 1 or self.purify_steps < 0:
            raise ValueError("every step, restart, EOT and draw count must be >= 1")

    def long(self, norm: str) -> AttackConfig:
        eps = self.eps_linf if norm == "linf" else self.eps_l2
        return AttackConfig(norm, eps, 2.5 * eps / self.long_steps, self.long_steps)

    def adaptive(self, random_start: bool = True, **kw) -> AdaptiveConfig:
        a = AttackConfig("linf", self.eps_linf, 2.5 * self.eps_linf / self.adaptive_steps, self.adaptive_steps,
                         random_start)
        return AdaptiveConfig(attack=a, eot=self.adaptive_eot, gradient="exact", attack_purify_steps=self.purify_steps or 1,
                              **kw)

    def params(self, name: str) -> dict:
        """The exact parameters of attack ``name``."""
        if name == "pgd-paper-linf":
            return {"target": "classifier", **asdict(PAPER_LINF)}
        if name == "pgd-paper-l2":
            return {"target": "classifier", **asdict(PAPER_L2)}
        if name in ("pgd-long-linf", "pgd-long-l2"):
            return {"target": "classifier", "restarts": self.restarts, **asdict(self.long(name.rsplit("-", 1)[1]))}
        if name == "transfer-site":
            return {"target": "classifier of site (k + 1) mod N", "restarts": self.restarts, **asdict(self.long("linf"))}
        if name in ("apgd-ce", "apgd-margin"):
            return {"target": "pipeline (expected output, exact gradients)", "library": "torchattacks.APGD",
                    "norm": "linf", "eps": self.eps_linf, "steps": self.apgd_steps, "eot": self.eot,
                    "loss": "ce" if name == "apgd-ce" else "logit margin (DLR for two classes)",
                    "purify_steps": self.purify_steps}
        return {"target": "pipeline (surrogate)", **_ADAPTIVE[name](self).to_dict()}


_ADAPTIVE = {
    "adaptive": lambda s: s.adaptive(restarts=s.restarts),
    # no random start: a dense +-eps start is exactly what the noise floor flags
    "adaptive-under-tau": lambda s: s.adaptive(False, objective="under_tau", detector_weight=10.0, restarts=1),
    "adaptive-textured": lambda s: s.adaptive(support="textured", restarts=s.restarts),
    "lowfreq": lambda s: s.adaptive(lowfreq=8, restarts=s.restarts),
}


class PipelineModel(nn.Module):
    """The defended pipeline as a differentiable model for gradient attacks: log of its expected output.

    ``log(p(x) softmax(f(purify(x))) + (1 - p(x)) softmax(f(x)))`` with p(x)
    the smoothed flag decision (1 when the defense purifies every scan) and a
    fresh purification noise at every call (so an attack's EOT averages over
    it); the purification is differentiated exactly.
    """

    def __init__(self, pipe: DefensePipeline, purify_steps: int = 1, temperature: float = 0.05, seed: int = 0):
        super().__init__()
        self.pipe, self.purify_steps, self.temperature = pipe, purify_steps, temperature
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pipe = self.pipe
        s = pipe.score(x)
        tau = pipe.tau
        p = flag_probability(pipe, s, self.temperature)
        t_star = t_star_of(s.detach().clamp_min(tau), tau, pipe.cfg)
        every = torch.ones(len(x), dtype=torch.bool, device=x.device)
        xp = pipe.purify_flagged(x, every, t_star, self.generator, steps=self.purify_steps)
        probs = p[:, None] * pipe.classifier(xp).softmax(1)
        if pipe.cfg.mode != "always":
            probs = probs + (1 - p[:, None]) * pipe.classifier(x).softmax(1)
        return probs.clamp_min(1e-12).log()


def _margin_apgd():
    import torchattacks

    class MarginAPGD(torchattacks.APGD):
        """APGD whose 'dlr' loss is the logit margin ``max_{j != y} z_j - z_y`` (DLR for two classes)."""

        def dlr_loss(self, x, y):
            other = x.clone()
            other[torch.arange(len(y)), y] = -float("inf")
            return other.max(1).values - x[torch.arange(len(y)), y]

    return MarginAPGD


def _apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SuiteConfig, loss: str, seed: int) -> torch.Tensor:
    import torchattacks

    cls = torchattacks.APGD if loss == "ce" else _margin_apgd()
    atk = cls(model, norm="Linf", eps=cfg.eps_linf, steps=cfg.apgd_steps, n_restarts=1, seed=seed,
              loss="ce" if loss == "ce" else "dlr", eot_iter=cfg.eot)
    return atk(x, y).detach()


def _long_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig, restarts: int,
              g: torch.Generator) -> torch.Tensor:
    """PGD with restarts on ``model``: per scan the first restart that fools it, else the last."""
    best, fooled = None, torch.zeros(len(y), dtype=torch.bool)
    for _ in range(restarts):
        adv = pgd(model, x, y, cfg, g)
        with torch.no_grad():
            wrong = model(adv).argmax(1) != y
        best = adv if best is None else torch.where(fooled.view(-1, 1, 1, 1), best, adv)
        fooled |= wrong
    return best


def resolved(cfg: SuiteConfig, pipe: DefensePipeline | None) -> SuiteConfig:
    """``cfg`` with ``purify_steps`` 0 replaced by the defense's own steps (2 where it runs every DDPM step)."""
    if cfg.purify_steps or pipe is None:
        return cfg
    return replace(cfg, purify_steps=pipe.cfg.steps or 2)


def craft(name: str, cfg: SuiteConfig, pipe: DefensePipeline | None, classifier: nn.Module, x: torch.Tensor,
          y: torch.Tensor, seed: int, other: nn.Module | None = None) -> torch.Tensor | None:
    """Adversarial scans of attack ``name``, or None where it does not apply (the detector-aware attacks on a
    system without a detector; ``transfer-site`` without another site's classifier ``other``). On a
    classifier-only system APGD attacks the classifier (no EOT: nothing is random)."""
    g = torch.Generator().manual_seed(seed)
    cfg = resolved(cfg, pipe)
    if name == "pgd-paper-linf":
        return pgd(classifier, x, y, PAPER_LINF, g)
    if name == "pgd-paper-l2":
        return pgd(classifier, x, y, PAPER_L2, g)
    if name in ("pgd-long-linf", "pgd-long-l2"):
        return _long_pgd(classifier, x, y, cfg.long(name.rsplit("-", 1)[1]), cfg.restarts, g)
    if name == "transfer-site":
        return None if other is None else _long_pgd(other, x, y, cfg.long("linf"), cfg.restarts, g)
    if pipe is None:  # no defense: the pipeline attacks are attacks on the classifier
        if name in ("apgd-ce", "apgd-margin"):
            return _apgd(classifier, x, y, replace(cfg, eot=1), "ce" if name == "apgd-ce" else "margin", seed)
        return None
    if name in ("apgd-ce", "apgd-margin"):
        model = PipelineModel(pipe, cfg.purify_steps, seed=seed).eval()
        return _apgd(model, x, y, cfg, "ce" if name == "apgd-ce" else "margin", seed)
    return adaptive_pgd(pipe, x, y, _ADAPTIVE[name](cfg), g)


# --------------------------------------------------------------------------- scoring


def outcomes(pipe: DefensePipeline | None, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int,
             seed: int, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Per scan and draw, whether the real system is right: ``correct [N, D]`` and ``flagged [N]``.

    Each draw runs the whole pipeline with its own purification noise
    (seed ``seed + d``); a classifier-only system is deterministic (D = 1).
    """
    from training.defense import run_batched

    if pipe is None:
        with torch.no_grad():
            pred = torch.cat([classifier(x[i : i + 64]).argmax(1) for i in range(0, len(x), 64)])
        return {"correct": (pred == y).numpy()[:, None], "flagged": np.zeros(len(y), bool)}
    cols, flagged = [], None
    for d in range(draws):
        out = run_batched(pipe, x, batch_size, seed + d)
        cols.append(out["probs"].argmax(1) == y.numpy())
        flagged = out["flagged"] if flagged is None else flagged
    return {"correct": np.stack(cols, 1), "flagged": flagged.astype(bool)}


def worst_of_n(correct: np.ndarray) -> np.ndarray:
    """``[N]``: right under every one of the D draws."""
    return np.asarray(correct, bool).all(1)


def majority_of_n(correct: np.ndarray) -> np.ndarray:
    """``[N]``: right in more than half of the D draws (a tie counts as wrong)."""
    c = np.asarray(correct, bool)
    return c.sum(1) * 2 > c.shape[1]


def summarise(correct: np.ndarray, flagged: np.ndarray) -> dict:
    """robust_acc (draw 0), worst_of_n, majority_of_n, flag_rate and scans of one attack's outcomes."""
    c = np.asarray(correct, bool)
    return {"scans": int(len(c)), "robust_acc": float(c[:, 0].mean()) if len(c) else float("nan"),
            "worst_of_n": float(worst_of_n(c).mean()) if len(c) else float("nan"),
            "majority_of_n": float(majority_of_n(c).mean()) if len(c) else float("nan"),
            "draws": int(c.shape[1]) if c.ndim == 2 else 1,
            "flag_rate": float(np.asarray(flagged, bool).mean()) if len(c) else float("nan")}


def worst_case(per_attack: dict[str, np.ndarray]) -> dict:
    """The per-scan worst case over attacks: a scan counts only if it survives every attack.

    ``per_attack``: name -> ``correct [N, D]`` on the same N scans. Returns
    single-draw, worst-of-N and majority-of-N accuracies and the attack that
    alone breaks the most scans.
    """
    if not per_attack:
        return {}
    single = np.all([c[:, 0] for c in per_attack.values()], 0)
    worst = np.all([worst_of_n(c) for c in per_attack.values()], 0)
    major = np.all([majority_of_n(c) for c in per_attack.values()], 0)
    strongest = min(per_attack, key=lambda k: per_attack[k][:, 0].mean())
    return {"scans": int(len(single)), "robust_acc": float(single.mean()), "worst_of_n": float(worst.mean()),
            "majority_of_n": float(major.mean()), "attacks": sorted(per_attack), "strongest": strongest}
