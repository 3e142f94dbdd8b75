"""Every Flower name this project uses that is not Flower's public app API, in one place.

Flower's public API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``,
``flwr.serverapp.strategy``, ``flwr.simulation``) is used directly
everywhere else. The in-process grid (``inprocess.py``) and the privacy
accountant (``privacy.py``) need a few internals that a minor Flower release
may move or rename; they are imported here only, and
``tests/test_flower_internals.py`` pins what the project relies on, so an
upgrade that breaks them fails one named test instead of a training run.
"""

from __future__ import annotations

from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import (
    NODE_ID_NUM_BYTES,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    RUN_ID_NUM_BYTES,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.supercore.corestate.utils import generate_rand_int_from_bytes
from flwr.supercore.date import now
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "ClientAppException", "ErrorCode", "NODE_ID_NUM_BYTES", "NUM_PARTITIONS_KEY", "PARTITION_ID_KEY",
    "RUN_ID_NUM_BYTES", "Run", "SUPERLINK_NODE_ID", "TaskIdentity", "generate_rand_int_from_bytes", "now",
    "set_message_id", "rdp_accountant",
]


def set_message_id(metadata, message_id: str) -> None:
    """Give a message the ID a grid assigns on push (Flower's own in-memory grid writes the same private field)."""
    metadata.__dict__["_message_id"] = message_id


def rdp_accountant():
    """Flower's RDP accountant: ``(RdpAccountant, PrivacyConfig, GaussianPrivacyEvent, NeighboringRelation, SamplingMethod)``."""
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return RdpAccountant, PrivacyConfig, GaussianPrivacyEvent, NeighboringRelation, SamplingMethod
