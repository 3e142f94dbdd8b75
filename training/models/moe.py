"""Personalized mixture of experts (MedFedPure's classifier).

K experts share nothing with each other; each is a timm backbone plus a
2-layer MLP head. K gating MLPs score psi(x), here the mean of the experts'
pooled backbone features (it costs nothing extra and is computed by shared
parameters only), and a softmax over the K scores weights the experts'
class probabilities. The experts are averaged across sites; the gates stay at
their site (see :func:`split_state_dict`).
"""

from __future__ import annotations

from contextlib import contextmanager

import timm
import torch
from torch import nn

from training.models.common import Normalize


class Expert(nn.Module):
    """Backbone + MLP head. ``forward`` maps ``[N, 1, H, W]`` to (features ``[N, F]``, logits ``[N, C]``)."""

    def __init__(self, backbone: str, num_classes: int, hidden: int, drop: float = 0.0, **backbone_kwargs):
        super().__init__()
        self.backbone = timm.create_model(backbone, pretrained=False, in_chans=1, num_classes=0, **backbone_kwargs)
        feat = self.backbone.num_features
        self.head = nn.Sequential(
            nn.Linear(feat, hidden), nn.ReLU(inplace=True), nn.Dropout(drop), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)
        return f, self.head(f)


class MixtureOfExperts(nn.Module):
    """``forward(x)`` with ``x`` in [0, 1], ``[N, 1, H, W]`` -> log mixture probabilities ``[N, C]``.

    Log-probabilities are valid logits (softmax gives back the mixture), so
    attacks and losses written for logits apply unchanged.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_experts: int = 3,
        num_classes: int = 2,
        head_hidden: int = 256,
        gate_hidden: int = 64,
        drop: float = 0.0,
        backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        kwargs = dict(backbone_kwargs or {})
        self.normalize = Normalize()
        self.experts = nn.ModuleList(
            Expert(backbone, num_classes, head_hidden, drop, **kwargs) for _ in range(num_experts)
        )
        feat = self.experts[0].backbone.num_features
        self.uniform_gates = False  # set by uniform_mixing(): every expert weighted 1/K, the gates unused
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(feat, gate_hidden), nn.ReLU(inplace=True), nn.Linear(gate_hidden, 1))
            for _ in range(num_experts)
        )

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the objective needs.

        Returns ``log_probs [N, C]``, ``expert_logits [N, K, C]``, ``gate_weights [N, K]``, and the experts'
        pooled backbone features ``features [N, K, F]``.
        """
        x = self.normalize(x)
        feats, logits = zip(*(e(x) for e in self.experts))
        feats = torch.stack(feats, 1)  # [N, K, F]
        expert_logits = torch.stack(logits, 1)  # [N, K, C]
        psi = feats.mean(1)  # [N, F]
        if self.uniform_gates:
            gate_weights = torch.full(expert_logits.shape[:2], 1.0 / len(self.experts), dtype=x.dtype, device=x.device)
        else:
            gate_weights = torch.cat([g(psi) for g in self.gates], 1).softmax(1)  # [N, K]
        log_probs = torch.logsumexp(expert_logits.log_softmax(-1) + gate_weights.clamp_min(1e-12).log()[..., None], 1)
        return {"log_probs": log_probs, "expert_logits": expert_logits, "gate_weights": gate_weights,
                "features": feats}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)["log_probs"]

    @contextmanager
    def uniform_mixing(self):
        """Within the block every expert is weighted 1/K and the gates are frozen (gate warm-up)."""
        self.uniform_gates = True
        self.gates.requires_grad_(False)
        try:
            yield self
        finally:
            self.uniform_gates = False
            self.gates.requires_grad_(True)


def site_local_keys(model: MixtureOfExperts, keep_bn_local: bool = False) -> set[str]:
    """State-dict keys that stay at the site: the gates, and with FedBN every batch-norm tensor."""
    keys = {k for k in model.state_dict() if k.startswith("gates.")}
    if keep_bn_local:
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                keys |= {f"{name}.{k}" for k in module.state_dict()}
    return keys


def split_state_dict(state: dict[str, torch.Tensor], local_keys: set[str]):
    """Split a state dict into (shared, local) parts by ``local_keys``; ``merge_state_dict`` inverts it."""
    shared = {k: v for k, v in state.items() if k not in local_keys}
    local = {k: v for k, v in state.items() if k in local_keys}
    return shared, local


def merge_state_dict(shared: dict[str, torch.Tensor], local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_state_dict`; refuses overlapping keys."""
    overlap = shared.keys() & local.keys()
    if overlap:
        raise ValueError(f"shared and local parts overlap: {sorted(overlap)[:5]}")
    return {**shared, **local}
