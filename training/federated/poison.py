"""Poisoned sites, for experiments with robust aggregation (``--poison``, ``--malicious-fraction``).

A malicious site trains like an honest one and then changes what it sends.
With ``u = w_local - w_global`` its honest update over the trainable
parameters it shares, it sends ``w_global + u'`` where ``u'`` is

- ``scaling``: ``lambda * u`` (``poison_scale``, 10 by default);
- ``partial``: ``u`` with a random half of its coordinates multiplied by lambda;
- ``signflip``: ``-u``;
- ``gaussian``: ``u + n``, ``n ~ N(0, s^2)`` per coordinate with ``s = 0.5 * ||u||_2``;
- ``labelflip``: the honest update of a site whose training labels are
  flipped (class c -> C - 1 - c) -- the data are poisoned, not the update.

Only trainable parameters are changed; batch-norm running statistics are
sent as trained (a negative running variance would make the model emit NaN
and tell nothing about the aggregator). Which sites are malicious is drawn
once per run from the run's seed (:func:`malicious_sites`); the noise and
the coordinates of ``partial`` are drawn per site and round.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch


def malicious_sites(n_sites: int, fraction: float, seed: int) -> list[int]:
    """The ``round(fraction * n_sites)`` malicious sites of a run (sorted)."""
    k = int(round(fraction * n_sites))
    if k <= 0:
        return []
    return sorted(int(i) for i in np.random.default_rng(seed + 104729).choice(n_sites, size=k, replace=False))


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class ``c`` becomes ``num_classes - 1 - c`` (the two classes of Br35H swap)."""
    return (num_classes - 1 - np.asarray(labels)).astype(np.asarray(labels).dtype)


def poison_update(kind: str, update: dict[str, torch.Tensor], scale: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The update a malicious site sends instead of ``update`` (name -> tensor, trainable parameters)."""
    if kind in ("none", "labelflip"):
        return update
    if kind == "scaling":
        return {k: v * scale for k, v in update.items()}
    if kind == "signflip":
        return {k: -v for k, v in update.items()}
    if kind == "partial":
        out = {}
        for k, v in update.items():
            mask = torch.rand(v.shape, generator=generator) < 0.5
            out[k] = torch.where(mask, v * scale, v)
        return out
    if kind == "gaussian":
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))
        return {k: v + torch.randn(v.shape, generator=generator, dtype=v.dtype) * (0.5 * norm) for k, v in update.items()}
    raise ValueError(f"unknown poisoning {kind!r}")


def poison_generator(seed: int, site: int, server_round: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"poison/{seed}/{site}/{server_round}".encode()))
