"""Training objectives, one per component. Each maps (model, batch, generator) to (loss, metrics).

Randomness (masks, timesteps, noise) comes from the ``generator`` argument, so
a step is exactly reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from training import config as cfgmod
from training.attacks.adaptive import AdaptiveConfig, textured_support
from training.attacks.pgd import pgd
from training.defense import DefensePipeline
from training.diffusion import GaussianDiffusion, purify, to_diffusion_space
from training.models.mae import MaskedAutoencoder, random_masks
from training.models.moe import MixtureOfExperts


def gate_l2(model: MixtureOfExperts) -> torch.Tensor:
    return sum(p.pow(2).sum() for p in model.gates.parameters())


def gate_imbalance(w: torch.Tensor) -> torch.Tensor:
    """log K - H(mean gate over the batch): 0 when the batch uses every expert equally, log K when one expert takes all."""
    mean = w.mean(0)
    return math.log(w.shape[1]) + (mean * mean.clamp_min(1e-12).log()).sum()


def feature_correlation(f: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean squared off-diagonal entry of the correlation matrix of features ``f [N, F]`` over the batch.

    FedDecorr's regulariser (Shi et al., ICLR 2023): 0 when the feature
    dimensions are uncorrelated over the batch, 1 when they are all one
    dimension (collapse). A batch of one scan has no correlation: 0.
    """
    n, d = f.shape
    if n < 2 or d < 2:
        return f.new_zeros(())
    z = (f - f.mean(0, keepdim=True)) / (f.var(0, keepdim=True, unbiased=False) + eps).sqrt()
    corr = z.T @ z / n
    off = corr - torch.diag_embed(torch.diagonal(corr))
    return off.pow(2).sum() / (d * (d - 1))


def moe_loss(model: MixtureOfExperts, x: torch.Tensor, y: torch.Tensor, beta: float, gamma: float,
             log_prior: torch.Tensor | None = None, balance: float = 0.0, decorrelation: float = 0.0):
    """Paper Eq. 9: CE of the mixture + beta * L2(gate params) + gamma * entropy(gate weights).

    ``log_prior`` ([C], already scaled by the adjustment strength): logit
    adjustment -- the cross-entropy is taken on ``log_probs + log_prior``.
    ``balance`` > 0 adds ``balance`` * :func:`gate_imbalance` (a load-balancing
    term: the entropy term acts per scan, this one on the batch's mean gate, so a
    site keeps every expert in use and every expert keeps learning from it).
    """
    out = model.forward_all(x)
    logits = out["log_probs"] if log_prior is None else out["log_probs"] + log_prior.to(x.device)
    ce = F.cross_entropy(logits, y)
    w = out["gate_weights"]
    entropy = -(w * w.clamp_min(1e-12).log()).sum(1).mean()
    imbalance = gate_imbalance(w)
    loss = ce + beta * gate_l2(model) + gamma * entropy
    if balance > 0:
        loss = loss + balance * imbalance
    metrics = {}
    if decorrelation > 0:  # each expert's features, separately: the experts share nothing
        feats = out["features"]
        decorr = torch.stack([feature_correlation(feats[:, k]) for k in range(feats.shape[1])]).mean()
        loss = loss + decorrelation * decorr
        metrics["decorrelation"] = decorr.item()
    acc = (out["log_probs"].argmax(1) == y).float().mean()
    return loss, {"ce": ce.item(), "gate_entropy": entropy.item(), "gate_imbalance": imbalance.item(),
                  "acc": acc.item(), **metrics}


def mae_loss(model: MaskedAutoencoder, x: torch.Tensor, mask: torch.Tensor):
    """Mean squared error on the hidden patches only (pixel units, no per-patch normalisation)."""
    err = model.patch_errors(x, mask)
    loss = (err * mask).sum() / mask.sum()
    return loss, {"mse_masked": loss.item()}


def eps_loss(model, diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
    """DDPM simple loss: || eps - eps_theta(q_sample(x0, t, eps), t) ||^2."""
    x_t = diffusion.q_sample(to_diffusion_space(x), t, noise)
    loss = F.mse_loss(model(x_t, t), noise)
    return loss, {"eps_mse": loss.item()}


@dataclass
class ClassifierObjective:
    beta: float
    gamma: float
    log_prior: torch.Tensor | None = None
    balance: float = 0.0
    decorrelation: float = 0.0

    def __call__(self, model, x, y, generator):
        return moe_loss(model, x, y, self.beta, self.gamma, self.log_prior, self.balance, self.decorrelation)


def adjusted_log_prior(labels, num_classes: int, strength: float) -> torch.Tensor | None:
    """``strength`` * log(class prior) of ``labels`` (add-one smoothed), or None when ``strength`` is 0."""
    if strength <= 0:
        return None
    counts = torch.bincount(torch.as_tensor(labels).long(), minlength=num_classes).double() + 1.0
    return (strength * (counts / counts.sum()).log()).float()


@dataclass
class DetectorObjective:
    mask_ratio: float

    def __call__(self, model, x, y, generator):
        mask = random_masks(x.shape[0], model.num_patches, self.mask_ratio, generator).to(x.device)
        return mae_loss(model, x, mask)


def random_crop(x: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """One random ``size`` x ``size`` window of a batch ``[N, C, H, W]`` (the same window for the batch)."""
    h, w = x.shape[-2:]
    if size <= 0 or size >= min(h, w):
        return x
    i, j = (int(v) for v in torch.randint(0, 1 << 30, (2,), generator=generator))
    i, j = i % (h - size + 1), j % (w - size + 1)
    return x[..., i : i + size, j : j + size]


@dataclass
class DenoiserObjective:
    diffusion: GaussianDiffusion
    t_max: int
    crop: int = 0

    def __call__(self, model, x, y, generator):
        x = random_crop(x, self.crop, generator)
        n = x.shape[0]
        t = torch.randint(1, self.t_max + 1, (n,), generator=generator).to(x.device)
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        return eps_loss(model, self.diffusion, x, t, noise)


def make_objective(component: str, profile):
    if component == "classifier":
        c = profile.classifier
        return ClassifierObjective(c.beta, c.gamma, balance=c.gate_balance, decorrelation=c.decorrelation)
    if component == "detector":
        return DetectorObjective(profile.detector.mask_ratio)
    if component == "denoiser":
        d = profile.denoiser
        return DenoiserObjective(GaussianDiffusion.from_config(d), d.t_max_train or d.num_steps, d.train_crop)
    raise ValueError(f"unknown component {component!r}")


# --------------------------------------------------------------------------- wrappers of a classifier objective
# Each takes the batch, changes what the model trains on, and hands it to ``base``.


def purify_at_random_t(denoiser: nn.Module, diffusion: GaussianDiffusion, x: torch.Tensor, t_min: int, t_max: int,
                       steps: int, generator: torch.Generator | None) -> torch.Tensor:
    """``x`` purified from one t* drawn uniformly in ``[t_min, t_max]`` (then the noise, from ``generator``)."""
    t = int(torch.randint(t_min, t_max + 1, (1,), generator=generator))
    return purify(denoiser, diffusion, x, t, steps or None, None, generator)


class PurifiedClassifier(nn.Module):
    """``classifier(purify(x))``: t* uniform in ``[t_min, t_max]`` and fresh noise at every call, differentiated
    exactly through the (frozen) denoiser -- what an attacker who knows the purifier attacks."""

    def __init__(self, classifier: nn.Module, denoiser: nn.Module, diffusion: GaussianDiffusion, t_min: int,
                 t_max: int, steps: int, generator: torch.Generator | None = None):
        super().__init__()
        self.classifier, self.denoiser, self.diffusion = classifier, denoiser, diffusion
        self.t_min, self.t_max, self.steps, self.generator = t_min, t_max, steps, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(purify_at_random_t(self.denoiser, self.diffusion, x, self.t_min, self.t_max, self.steps,
                                                  self.generator))


@dataclass
class AdversarialObjective:
    """PGD examples for a random fraction of each batch, crafted on the current model (eval mode).

    ``through``: a purifier ``(denoiser, diffusion, t_min, t_max, steps)``; the examples are then crafted on
    :class:`PurifiedClassifier` -- through the purification, exact gradients, fresh noise at every step.
    ``textured_fraction`` of the examples perturb only the textured pixels (outside the flattest
    ``flat_fraction`` and their neighbours: the suite's ``adaptive-textured`` attacker, a sparser perturbation
    than dense L-inf PGD); the rest perturb every pixel.
    """

    base: object
    attack: cfgmod.AttackConfig
    fraction: float
    through: tuple | None = None
    textured_fraction: float = 0.0
    flat_fraction: float = AdaptiveConfig.flat_fraction  # the suite's textured attacker's

    def __post_init__(self):
        if not 0.0 <= self.textured_fraction <= 1.0 or not 0.0 <= self.flat_fraction < 1.0:
            raise cfgmod.UsageError("textured_fraction must be in [0, 1] and flat_fraction in [0, 1)")

    def __call__(self, model, x, y, generator):
        n_adv = int(round(self.fraction * x.shape[0]))
        if n_adv > 0 and self.attack.steps > 0:
            idx = torch.randperm(x.shape[0], generator=generator)[:n_adv]
            was_training = model.training
            model.eval()
            target = model if self.through is None else PurifiedClassifier(model, *self.through, generator=generator)
            xa, support = x[idx], None
            n_tex = int(round(self.textured_fraction * n_adv))
            if n_tex > 0:
                support = torch.ones_like(xa)
                support[:n_tex] = textured_support(xa[:n_tex], self.flat_fraction)
            x_adv = pgd(target, xa, y[idx], self.attack, generator, support=support)
            model.train(was_training)
            x = x.clone()
            x[idx] = x_adv
        return self.base(model, x, y, generator)


@dataclass
class PurifyingObjective:
    """MedFedPure Algorithm 3, lines 10-13: scans the detector flags are purified before the step."""

    base: object
    defense: DefensePipeline

    def __call__(self, model, x, y, generator):
        with torch.no_grad():
            r = self.defense.purified_inputs(x, generator)
        loss, metrics = self.base(model, r["x_in"], y, generator)
        return loss, {**metrics, "flagged": float(r["flagged"].float().mean())}


@dataclass
class PurifiedAugmentObjective:
    """Purify a random ``fraction`` of each batch (t* uniform in ``[t_min, t_max]``) before ``base``."""

    base: object
    denoiser: nn.Module
    diffusion: GaussianDiffusion
    fraction: float
    t_min: int
    t_max: int
    steps: int

    def __call__(self, model, x, y, generator):
        n = int(round(self.fraction * x.shape[0]))
        if n > 0:
            idx = torch.randperm(x.shape[0], generator=generator)[:n]
            with torch.no_grad():
                purified = purify_at_random_t(self.denoiser, self.diffusion, x[idx], self.t_min, self.t_max,
                                              self.steps, generator)
            x = x.clone()
            x[idx] = purified
        return self.base(model, x, y, generator)
