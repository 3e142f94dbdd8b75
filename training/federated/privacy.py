"""Fed-Safe's distributed noise and its privacy account.

Every honest site clips its update ``u`` (the floating-point arrays it
shares) to L2 norm ``C`` and adds ``N(0, sigma^2 C^2)`` to each coordinate
before sending (:func:`privatize`); optionally it also trains from weights
with ``N(0, s^2)`` added to what it received (:func:`noisy_weights`, Fed-Safe's
noise on the transmitted weights). Batch-norm statistics stay at the sites
under this option (``task.bn_kept_local``): they are computed from scans and
would otherwise leave without noise.

Privacy (:class:`PrivacyLedger`): each round, each site releases one
Gaussian mechanism of sensitivity ``C`` and noise multiplier ``sigma``. The
ledger composes these releases with Flower's RDP accountant (no sampling
amplification: every site takes part in every round) and reports the
site-level epsilon at ``delta`` after each round -- what one site's data can
leak to anyone who sees its update, the server included. Under secure
aggregation the server would only see the sum, whose noise multiplier is
``sigma * sqrt(n)`` (also reported, as ``epsilon_aggregate``).
"""

from __future__ import annotations

import math

import torch


def update_norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))


def clip(update: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """``update`` scaled to L2 norm at most ``max_norm`` (over all arrays together)."""
    norm = update_norm(update)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in update.items()}


def privatize(update: dict[str, torch.Tensor], max_norm: float, sigma: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Clip to ``max_norm`` and add N(0, (sigma * max_norm)^2) per coordinate."""
    clipped = clip(update, max_norm)
    if sigma <= 0:
        return clipped
    std = sigma * max_norm
    return {k: v + torch.randn(v.shape, generator=generator, dtype=v.dtype) * std for k, v in clipped.items()}


def noisy_weights(weights: dict[str, torch.Tensor], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Floating-point arrays with N(0, std^2) added (others unchanged)."""
    return {k: (v + torch.randn(v.shape, generator=generator, dtype=v.dtype) * std) if v.is_floating_point() else v
            for k, v in weights.items()}


class PrivacyLedger:
    """Site-level (epsilon, delta) of ``rounds`` Gaussian releases with noise multiplier ``sigma`` (Flower's RDP accountant)."""

    def __init__(self, sigma: float, sites: int, delta: float):
        from training.federated.flower_internals import rdp_accountant

        RdpAccountant, PrivacyConfig, _, NeighboringRelation, SamplingMethod = rdp_accountant()

        if sigma <= 0:
            raise ValueError("a privacy account needs sigma > 0")
        self.sigma, self.sites, self.delta = sigma, sites, delta

        def make():
            return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=max(1, sites),
                                               neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                               sampling_method=SamplingMethod.NO_AMPLIFICATION))

        self.site, self.aggregate = make(), make()

    def step(self, rounds: int = 1) -> dict[str, float]:
        from training.federated.flower_internals import rdp_accountant

        GaussianPrivacyEvent = rdp_accountant()[2]

        n = max(1, self.sites)
        self.site.compose(GaussianPrivacyEvent(noise_multiplier=self.sigma, sample_size=n, population_size=n), rounds)
        self.aggregate.compose(GaussianPrivacyEvent(noise_multiplier=self.sigma * math.sqrt(n), sample_size=n,
                                                    population_size=n), rounds)
        return self.spent()

    def spent(self) -> dict[str, float]:
        return {"epsilon": self.site.get_epsilon(self.delta), "epsilon_aggregate": self.aggregate.get_epsilon(self.delta),
                "delta": self.delta, "rounds": self.site.num_releases}
