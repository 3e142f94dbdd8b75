"""Projected gradient descent (Madry et al. 2018) in [0, 1] pixel space.

Every iterate is projected onto the eps-ball around the clean scan and clamped
to [0, 1]. The random start is drawn from the ``generator`` argument, so an
attack is exactly reproducible. The model maps ``[N, 1, H, W]`` in [0, 1] to
logits (log-probabilities are logits too).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from training.config import AttackConfig

# The paper's settings (Table II and Table I; PROTOCOL.md).
PAPER_LINF = AttackConfig("linf", 0.015, 0.003, 7)
PAPER_L2 = AttackConfig("l2", 0.1, 0.01, 10)


def _l2_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = _l2_norm(delta)
    return delta * torch.clamp(eps / (n + 1e-12), max=1.0)


def random_start(x: torch.Tensor, cfg: AttackConfig, generator: torch.Generator | None) -> torch.Tensor:
    """A uniform point of the eps-ball (L-inf: per pixel; L2: uniform direction and radius^(1/d))."""
    if cfg.norm == "linf":
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return (u * 2.0 - 1.0) * cfg.eps
    d = x[0].numel()
    g = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    r = torch.rand((x.shape[0],), generator=generator, dtype=x.dtype).to(x.device) ** (1.0 / d)
    return g / _l2_norm(g) * r.view(-1, *([1] * (x.dim() - 1))) * cfg.eps


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AttackConfig = PAPER_LINF,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
    loss_fn=None,
    support: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adversarial ``x`` (detached, in [0, 1]) that maximises ``loss_fn(model(x_adv), y)`` (CE by default).

    ``support`` (0/1, broadcastable to ``x``): the pixels the attack may change; the others keep their clean
    value (e.g. :func:`training.attacks.adaptive.textured_support`, an attacker who leaves flat pixels alone).

    ``start`` fixes the initial perturbation (e.g. to compare with another
    library); otherwise it is drawn from ``generator`` when ``cfg.random_start``.
    The model's train/eval mode is left as it is: put it in eval mode first.
    """
    loss_fn = loss_fn or F.cross_entropy
    x = x.detach()
    if start is not None:
        delta = start.detach().clone()
    elif cfg.random_start:
        delta = random_start(x, cfg, generator)
    else:
        delta = torch.zeros_like(x)
    if support is not None:
        delta = delta * support
    x_adv = (x + project(delta, cfg.norm, cfg.eps)).clamp(0.0, 1.0)
    for _ in range(cfg.steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        if support is not None:
            grad = grad * support
        with torch.no_grad():
            if cfg.norm == "linf":
                x_adv = x_adv + cfg.step * grad.sign()
            else:
                x_adv = x_adv + cfg.step * grad / (_l2_norm(grad) + 1e-12)
            x_adv = (x + project(x_adv - x, cfg.norm, cfg.eps)).clamp(0.0, 1.0)
    return x_adv.detach()
