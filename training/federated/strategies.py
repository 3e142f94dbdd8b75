"""Aggregation strategies: Flower's own, configured for a run.

Every method averages what is shared with Flower's ``FedAvg`` (weighted by
each site's number of training scans); what is personal never reaches the
server (see ``task.local_keys``). ``local`` sends nothing: :class:`LocalOnly`
keeps the (empty) global arrays as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from training import config as cfgmod


class LocalOnly(FedAvg):
    """No federation: sites train alone; the server only relays configuration and collects metrics."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [m for m in replies if not m.has_error()]
        if not valid:
            return None, None
        return ArrayRecord(), self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


def make_strategy(phase: str, profile: cfgmod.Profile, grid_sites: int) -> FedAvg:
    """The strategy of ``phase``: all ``grid_sites`` sites train and evaluate every round."""
    fed = profile.federated
    kwargs = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=grid_sites,
                  min_evaluate_nodes=grid_sites, min_available_nodes=grid_sites)
    if phase == "classifier" and fed.method == "local":
        return LocalOnly(**kwargs)
    return FedAvg(**kwargs)
