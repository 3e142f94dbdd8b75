"""Stochastic weight averaging across rounds, for the classifier phase (``swa_rounds = N``).

Under label skew the aggregated model of one round lands where that round's
sites pulled it, and consecutive rounds scatter around a better point. Like
SWA (Izmailov et al., UAI 2018) and its federated use (Caldarola et al.,
ECCV 2022), the server keeps the running mean of the shared arrays it
aggregated in the phase's last N rounds; the rounds train on from their own,
unaveraged arrays, and the mean is what the sites keep. Averaged weights
change every layer's activations, so the shared batch-norm statistics of the
mean are measured again at the sites before the last evaluation (as
``torch.optim.swa_utils.update_bn`` does centrally).

The running mean is saved with every round (``RUN/server/<phase>-swa.pt``), so
a resumed run averages the same rounds as one trained in one go.
"""

from __future__ import annotations

from pathlib import Path

import torch


class RoundAverage:
    """The running mean of the floating-point shared arrays of the rounds added; others are taken as last added."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.count = int(state.get("count", 0))
        self.mean: dict[str, torch.Tensor] = dict(state.get("mean", {}))

    def add(self, arrays: dict[str, torch.Tensor]) -> None:
        self.count += 1
        for k, v in arrays.items():
            if not v.is_floating_point() or k not in self.mean:
                self.mean[k] = v.detach().clone()
            else:
                self.mean[k] = self.mean[k] + (v.detach() - self.mean[k]) / self.count

    def averaged(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise RuntimeError("no round has been averaged")
        return {k: v.clone() for k, v in self.mean.items()}

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean}


def first_round(rounds: int, swa_rounds: int) -> int:
    """The first round of the average (``swa_rounds`` > 0)."""
    return rounds - swa_rounds + 1


def load(path: Path, done: int, rounds: int, swa_rounds: int) -> RoundAverage:
    """The average of a run that finished ``done`` rounds; refuses a missing file once averaging has begun."""
    if done >= first_round(rounds, swa_rounds):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the run cannot resume the weight average after round {done}")
        return RoundAverage(torch.load(path, map_location="cpu", weights_only=True))
    return RoundAverage()
