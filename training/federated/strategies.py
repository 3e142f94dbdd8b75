"""Aggregation strategies: Flower's own where Flower has them, configured for a run.

``--aggregation`` (classifier phase; the denoiser and detector phases of
MedFedPure average with FedAvg):

- ``fedavg``: Flower's ``FedAvg``, weighted by each site's training scans;
- ``krum`` / ``multikrum`` / ``bulyan``: Flower's ``Krum``, ``MultiKrum``
  (keeps n - f updates) and ``Bulyan``, with f = ``byzantine`` assumed
  malicious sites (-1: ``ceil(0.4 n)``, lowered to the most each rule
  tolerates: Krum needs n > 2f + 2, Bulyan n >= 4f + 3);
- ``median``: Flower's ``FedMedian`` (coordinate-wise median);
- ``trimmed``: Flower's ``FedTrimmedAvg`` (``trim_beta`` cut at each end);
- ``fltrust`` / ``optigradtrust``: :class:`RootTrust` (``robust.py``), which
  need the server's root set (:class:`RootSet`).

What is personal never reaches the server (see ``task.local_keys``).
``local`` sends nothing: :class:`LocalOnly` keeps the (empty) global arrays.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from training import config as cfgmod
from training.federated import robust


class LocalOnly(FedAvg):
    """No federation: sites train alone; the server only relays configuration and collects metrics."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [m for m in replies if not m.has_error()]
        if not valid:
            return None, None
        return ArrayRecord(), self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


def byzantine_count(aggregation: str, sites: int, byzantine: int) -> int:
    """f for Krum / MultiKrum / Bulyan: the configured count, or ceil(0.4 n), within what the rule tolerates."""
    f = math.ceil(0.4 * sites) if byzantine < 0 else byzantine
    limit = (sites - 3) // 4 if aggregation == "bulyan" else (sites - 3) // 2
    if byzantine >= 0 and f > limit:
        raise ValueError(f"{aggregation} with {sites} sites tolerates at most {max(limit, 0)} malicious sites, "
                         f"not {f} (--byzantine)")
    return max(0, min(f, limit))


class RootSet:
    """The server's root set and its copy of the classifier: reference updates and root-set losses.

    ``images`` / ``labels`` are clean training scans the server holds. The
    server trains the current global model on them exactly as a site would
    (``task.local_train``: same local epochs, objective and learning-rate
    schedule), which gives the reference update ``g_0``; two more reference
    updates on random halves of the root set feed OptiGradTrust's VAE.
    The server's personal arrays (gates, batch-norm when they stay local)
    are its own and persist across rounds.
    """

    def __init__(self, profile: cfgmod.Profile, images: np.ndarray, labels: np.ndarray, class_names: list[str]):
        from training.federated import task

        self.profile = profile
        self.task = task
        self.images, self.labels, self.class_names = images, labels, class_names
        self.model = task.build_model("classifier", profile)
        self.local_keys = task.local_keys("classifier", self.model, profile)
        self.local_state = {k: v.clone() for k, v in self.model.state_dict().items() if k in self.local_keys}

    def _site_data(self, idx: np.ndarray, site: int):
        from training.data.datasets import Split

        t = self.task
        n = len(idx)
        split = Split(self.images[idx], self.labels[idx], np.arange(n), [f"root-{i}" for i in idx])
        empty = Split(self.images[:0], self.labels[:0], np.arange(0), [])
        return t.SiteData(site, 1, self.class_names, "root", {"train": split, "val": empty, "test": empty})

    def _load(self, global_state: dict[str, torch.Tensor], local: dict[str, torch.Tensor]) -> None:
        state = self.model.state_dict()
        state.update({k: v for k, v in global_state.items() if k in state})
        state.update(local)
        self.model.load_state_dict(state)

    def reference_updates(self, global_state: dict[str, torch.Tensor], keys: list[str], server_round: int,
                          extra: int = 0) -> torch.Tensor:
        """(1 + extra, d): g_0 on the whole root set, then ``extra`` on random halves (flattened over ``keys``)."""
        rng = np.random.default_rng(server_round)
        out = []
        for j in range(1 + extra):
            idx = np.arange(len(self.labels)) if j == 0 else np.sort(rng.permutation(len(self.labels))[: max(2, len(self.labels) // 2)])
            self._load(global_state, self.local_state)
            with torch.random.fork_rng(devices=[]):  # dropout draws from the seed, not from the global RNG's state
                torch.manual_seed(zlib.crc32(f"root/{self.profile.seed}/{server_round}/{j}".encode()))
                self.task.local_train("classifier", self.model, self._site_data(idx, -1 - j), self.profile, server_round)
            state = self.model.state_dict()
            if j == 0:
                self.local_state = {k: v.clone() for k, v in state.items() if k in self.local_keys}
            out.append(torch.cat([(state[k] - global_state[k]).flatten().float() for k in keys]))
        return torch.stack(out)

    def loss(self, global_state: dict[str, torch.Tensor], keys: list[str], update: torch.Tensor | None) -> float:
        """Cross-entropy on the root set of the global model plus ``update`` (None: the global model)."""
        state = dict(global_state)
        if update is not None:
            state.update(unflatten(update, global_state, keys, add=True))
        self._load(state, self.local_state)
        self.model.eval()
        with torch.no_grad():
            x = torch.from_numpy(self.images)[:, None]
            logits = torch.cat([self.model(x[i:i + 64]) for i in range(0, len(x), 64)])
            loss = F.cross_entropy(logits, torch.from_numpy(self.labels).long())
        return float(loss) if math.isfinite(float(loss)) else 1e6


def flatten(state: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].flatten().float() for k in keys])


def unflatten(vec: torch.Tensor, like: dict[str, torch.Tensor], keys: list[str], add: bool = False) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k in keys:
        n = like[k].numel()
        part = vec[i:i + n].view_as(like[k]).to(like[k].dtype)
        out[k] = like[k] + part if add else part
        i += n
    return out


class RootTrust(FedAvg):
    """FLTrust or OptiGradTrust over the sites' updates (``robust.py``); remembers each site's trust."""

    def __init__(self, rule: str, root: RootSet, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.rule, self.root, self.seed = rule, root, seed
        self._global: ArrayRecord | None = None
        self.ogt: robust.OptiGradTrust | None = None
        self.last_trust: dict[int, float] = {}
        self.last_excluded: dict[int, bool] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [m for m in replies if not m.has_error()]
        if not valid or self._global is None:
            return None, None
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        glob = self._global.to_torch_state_dict()
        keys = [k for k, v in glob.items() if v.is_floating_point()]
        states = [m.content["arrays"].to_torch_state_dict() for m in valid]
        updates = torch.stack([flatten(s, keys) - flatten(glob, keys) for s in states])
        updates = torch.nan_to_num(updates, nan=0.0, posinf=0.0, neginf=0.0)
        sizes = torch.tensor([float(next(iter(m.content.metric_records.values()))[self.weighted_by_key]) for m in valid])
        refs = self.root.reference_updates(glob, keys, server_round, extra=2 if self.rule == "optigradtrust" else 0)
        if self.rule == "fltrust":
            agg, trust = robust.fltrust(updates, refs[0])
            excluded = (trust <= 0).tolist()
        else:
            if self.ogt is None:
                self.ogt = robust.OptiGradTrust(dim=updates.shape[1], seed=self.seed)
            agg, info = self.ogt.aggregate(updates, sizes / sizes.sum(), refs[0], refs,
                                           lambda v: self.root.loss(glob, keys, v))
            trust = torch.tensor(info["trust"])
            excluded = [not k for k in info["kept"]]
        self.last_excluded = {int(m.metadata.src_node_id): bool(e) for m, e in zip(valid, excluded, strict=True)}
        self.last_trust = {int(m.metadata.src_node_id): float(t) for m, t in zip(valid, trust, strict=True)}
        new = dict(glob)
        new.update(unflatten(agg, glob, keys, add=True))
        return ArrayRecord(new), metrics


class ServerOptimizer:
    """Mixin over Flower's ``FedAvgM`` / ``FedAdam`` / ``FedYogi``: the optimizer moves the parameters only.

    Flower's server optimizers treat every array alike; batch-norm running
    statistics and batch counters are not parameters (a momentum or Adam step
    on a running variance can make it negative), so ``buffers`` are replaced
    by their plain weighted average. :meth:`state` / :meth:`load_state` carry
    the optimizer's moments across a restart (``RUN/server/<phase>-opt.pt``).
    """

    buffers: frozenset[str] = frozenset()

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        plain, _ = FedAvg.aggregate_train(self, server_round, replies)
        stepped, metrics = super().aggregate_train(server_round, replies)
        if stepped is None or plain is None:
            return stepped, metrics
        out = ArrayRecord({k: (plain[k] if k in self.buffers
                               else Array(stepped[k].numpy().astype(plain[k].numpy().dtype, copy=False)))
                           for k in stepped.keys()})
        return out, metrics

    def state(self) -> dict:
        """FedAdam's / FedYogi's first and second moments (None before the first round)."""
        return {k: None if getattr(self, k) is None else {n: torch.from_numpy(np.array(v)) for n, v in getattr(self, k).items()}
                for k in ("m_t", "v_t")}

    def load_state(self, state: dict) -> None:
        for k in ("m_t", "v_t"):
            v = state.get(k)
            setattr(self, k, None if v is None else {n: a.numpy() for n, a in v.items()})


class ServerAvgM(ServerOptimizer, FedAvgM):
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        out, metrics = super().aggregate_train(server_round, replies)
        if out is not None:  # FedAvgM steps from the arrays it returned last; keep them identical
            self.current_arrays = out
        return out, metrics

    def state(self) -> dict:
        mv = self.momentum_vector
        return {"momentum": None if mv is None else [torch.from_numpy(np.array(v)) for v in mv]}

    def load_state(self, state: dict) -> None:
        mv = state.get("momentum")
        self.momentum_vector = None if mv is None else [v.numpy() for v in mv]


class ServerAdam(ServerOptimizer, FedAdam):
    pass


class ServerYogi(ServerOptimizer, FedYogi):
    pass


def make_server_optimizer(fed: cfgmod.FederatedConfig, buffers: Iterable[str], **kwargs) -> ServerOptimizer:
    """Flower's server optimizer ``fed.server_opt`` (fedavgm | fedadam | fedyogi), parameters only."""
    if fed.server_opt == "fedavgm":
        strategy = ServerAvgM(server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum, **kwargs)
    elif fed.server_opt in ("fedadam", "fedyogi"):
        adaptive = ServerAdam if fed.server_opt == "fedadam" else ServerYogi
        strategy = adaptive(eta=fed.server_lr, beta_1=fed.server_momentum, beta_2=0.99, tau=1e-3, **kwargs)
    else:
        raise ValueError(f"no server optimizer for {fed.server_opt!r}")
    strategy.buffers = frozenset(buffers)
    return strategy


def make_strategy(phase: str, profile: cfgmod.Profile, grid_sites: int, root: RootSet | None = None,
                  buffers: Iterable[str] = ()) -> FedAvg:
    """The strategy of ``phase``: all ``grid_sites`` sites train and evaluate every round.

    ``buffers``: shared keys that are not parameters (batch-norm statistics), averaged plainly by a server optimizer.
    """
    fed = profile.federated
    kwargs = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=grid_sites,
                  min_evaluate_nodes=grid_sites, min_available_nodes=grid_sites)
    if phase == "classifier" and fed.method == "local":
        return LocalOnly(**kwargs)
    agg = fed.aggregation if phase == "classifier" else "fedavg"
    if agg in ("krum", "multikrum", "bulyan"):
        f = byzantine_count(agg, grid_sites, fed.byzantine)
        if agg == "krum":
            return Krum(num_malicious_nodes=f, **kwargs)
        if agg == "multikrum":
            return MultiKrum(num_malicious_nodes=f, num_nodes_to_select=max(1, grid_sites - f), **kwargs)
        return Bulyan(num_malicious_nodes=f, **kwargs)
    if agg == "median":
        return FedMedian(**kwargs)
    if agg == "trimmed":
        return FedTrimmedAvg(beta=fed.trim_beta, **kwargs)
    if agg in ("fltrust", "optigradtrust"):
        if root is None:
            raise ValueError(f"{agg} needs the server's root set of clean scans")
        return RootTrust(agg, root, seed=profile.seed, **kwargs)
    if phase == "classifier" and fed.server_opt != "fedavg":
        return make_server_optimizer(fed, buffers, **kwargs)
    return FedAvg(**kwargs)
