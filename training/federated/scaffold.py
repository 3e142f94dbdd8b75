"""SCAFFOLD control variates (Karimireddy et al., ICML 2020), for the classifier phase (``scaffold = true``).

Label-skewed sites drift: a site that holds mostly one class pulls the shared
weights towards its own optimum, and the average of such pulls is not the
pooled optimum. SCAFFOLD corrects every local step by the difference between
the federation's mean gradient ``c`` and the site's own ``c_i``::

    g  <-  g + c - c_i        (before clipping and the optimizer's step)

so that a site's local steps follow the federation's direction. ``c_i`` is
the site's mean gradient over its previous round's steps (the paper's
option II measured in gradient space, which does not assume plain SGD: the
sites here step with AdamW), kept at the site with its personal arrays;
``c`` is kept by the server, which moves it by the mean of the sites'
changes ``c_i+ - c_i`` (``c <- c + (1/N) sum_i delta_i``, N the federation's
sites). In the first round ``c = c_i = 0`` and the round is plain FedAvg.

What a site sends besides its weights is its change of ``c_i``: a mean
gradient, which the privacy accounting of ``dp_clip`` / ``dp_sigma`` does
not cover (the configuration refuses the two together).
"""

from __future__ import annotations

import torch
from torch import nn

PREFIX = "control/"  # the site's c_i among its personal arrays: control/<parameter>
SERVER_RECORD = "control"  # the server's c, in the train message
DELTA_RECORD = "control-delta"  # the site's c_i+ - c_i, in its reply


class ScaffoldCorrection:
    """The ``after_backward`` hook of a SCAFFOLD round at one site.

    ``server`` (``c``) and ``site`` (``c_i``) map parameter names to arrays;
    a name missing from either counts as zeros. Only the parameters named in
    ``shared`` are corrected (a site's personal gates are not federated).
    Each call records the raw gradients, then adds ``c - c_i`` to them.
    """

    def __init__(self, model: nn.Module, shared, server: dict[str, torch.Tensor], site: dict[str, torch.Tensor]):
        shared = set(shared)
        self.params = [(n, p) for n, p in model.named_parameters() if n in shared and p.requires_grad]
        self.site = {n: site[n].detach().clone() if n in site else torch.zeros_like(p, memory_format=torch.contiguous_format)
                     for n, p in self.params}
        self.shift = {n: (server[n] - self.site[n]) if n in server else -self.site[n] for n, _ in self.params}
        self.sums = {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in self.params}
        self.steps = 0

    def __call__(self, model: nn.Module) -> None:
        with torch.no_grad():
            for n, p in self.params:
                if p.grad is None:
                    continue
                self.sums[n] += p.grad
                p.grad += self.shift[n].to(p.grad.dtype)
        self.steps += 1

    def control(self) -> dict[str, torch.Tensor]:
        """``c_i+``: the mean raw gradient over this round's steps (``c_i`` if no step was taken)."""
        if self.steps == 0:
            return {n: v.clone() for n, v in self.site.items()}
        return {n: (s / self.steps).contiguous() for n, s in self.sums.items()}

    def delta(self) -> dict[str, torch.Tensor]:
        """``c_i+ - c_i``, what the site sends."""
        new = self.control()
        return {n: new[n] - self.site[n] for n in new}


def site_control(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``c_i`` from the site's saved personal arrays (empty before its first SCAFFOLD round)."""
    return {k[len(PREFIX):]: v for k, v in local.items() if k.startswith(PREFIX)}


def saved_control(control: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``c_i`` as personal arrays (``control/<parameter>``)."""
    return {PREFIX + n: v for n, v in control.items()}


def server_update(control: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]],
                  sites: int) -> dict[str, torch.Tensor]:
    """``c + (1/sites) * sum of the deltas`` (a name missing from ``control`` starts at zeros)."""
    if sites < 1:
        raise ValueError("sites must be >= 1")
    out = {n: v.clone() for n, v in control.items()}
    for d in deltas:
        for n, v in d.items():
            out[n] = out.get(n, torch.zeros_like(v)) + v / sites
    return out
