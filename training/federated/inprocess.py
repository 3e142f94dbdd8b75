"""In-process simulation: the ServerApp and N simulated sites in one Python process, without Ray.

:class:`InProcessGrid` is a Flower ``Grid`` whose nodes live in this process:
one persistent ``Context`` per node (``node_config`` = ``partition-id`` /
``num-partitions``, its own ``state``, empty ``run_config``), as Flower's
simulation gives them. ``send_and_receive`` hands each message to the
ClientApp (``client_app(message, context)``), one site after another, and
returns the replies with the metadata Flower gives them (``src_node_id`` the
site's node, ``reply_to_message_id`` the message's ID, fresh message IDs).

It behaves as Flower's simulation does where the ServerApp can tell:

- every site gets its own copy of the message, as if it came over the wire;
- a handler that raises answers with an error Message
  (``CLIENT_APP_RAISED_EXCEPTION``) and leaves its node's ``context`` as it
  was; the server carries on;
- messages to unknown nodes are dropped (no reply), and ``timeout`` is kept
  between sites (a site already training is not interrupted).

It saves Ray's start-up (seconds per run) and runs one site at a time, each
with all the torch threads it asks for; ``python -m training train --backend
inprocess`` uses it (see ``run.py``).
"""

from __future__ import annotations

import copy
import logging
import time
import traceback
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from training.federated.flower_internals import (
    NODE_ID_NUM_BYTES,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    RUN_ID_NUM_BYTES,
    SUPERLINK_NODE_ID,
    ClientAppException,
    ErrorCode,
    Run,
    TaskIdentity,
    generate_rand_int_from_bytes,
    now,
    set_message_id,
)

logger = logging.getLogger("flwr")


class InProcessGrid(Grid):
    """``num_nodes`` simulated sites that answer ``client_app``'s handlers in this process, in turn."""

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
        # Messages built with ``Message(...)`` (as the strategies do) take run and source from here,
        # set as ``flwr.simulation.run_simulation`` sets it for the ServerApp it runs in-process.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, self._run.run_id, SUPERLINK_NODE_ID
        self.contexts: dict[int, Context] = {}
        for k in range(num_nodes):
            node_id = generate_rand_int_from_bytes(NODE_ID_NUM_BYTES, exclude={0, SUPERLINK_NODE_ID, *self.contexts})
            self.contexts[node_id] = Context(
                run_id=self._run.run_id, node_id=node_id, state=RecordDict(), run_config={},
                node_config={PARTITION_ID_KEY: k, NUM_PARTITIONS_KEY: num_nodes})
        self._pending: dict[str, Message] = {}  # pushed, not yet delivered (message ID -> message)
        self._replies: dict[str, Message] = {}  # delivered, not yet pulled (message ID -> reply)

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run
        TaskIdentity.run_id = run.run_id
        for ctx in self.contexts.values():
            ctx.run_id = run.run_id

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue the messages for their nodes; returns their (new) message IDs."""
        ids = []
        for msg in messages:
            md = msg.metadata
            set_message_id(md, str(uuid4()))
            if md.reply_to_message_id or md.ttl <= 0 or md.delivered_at:
                raise ValueError(f"Invalid message: {msg}")
            if md.dst_node_id not in self.contexts:
                logger.error("Invalid destination node ID for Message: %s", md.dst_node_id)
                continue
            self._pending[md.message_id] = msg
            ids.append(md.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str], deadline: float | None = None) -> Iterable[Message]:
        """Deliver the pending ones of ``message_ids`` (until ``deadline``, ``time.time()``) and return their replies."""
        ids = list(message_ids)
        for mid in ids:
            if mid in self._pending and (deadline is None or time.time() < deadline):
                self._replies[mid] = self._deliver(self._pending.pop(mid))
        return [self._replies.pop(mid) for mid in ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = self.push_messages(messages)
        return self.pull_messages(ids, deadline=None if timeout is None else time.time() + timeout)

    def _deliver(self, msg: Message) -> Message:
        """Run the ClientApp of the message's node on a copy of it; an exception becomes an error reply."""
        node_id = msg.metadata.dst_node_id
        msg = copy.deepcopy(msg)  # the site's own copy (array bytes are immutable and shared)
        msg.metadata.delivered_at = now().isoformat()
        context = copy.deepcopy(self.contexts[node_id])  # kept only if the handler succeeds
        try:
            reply = self.client_app(msg, context)
            if not isinstance(reply, Message):
                raise TypeError(f"the ClientApp returned {type(reply).__name__}, not a Message")
            self.contexts[node_id] = context
        except Exception as ex:  # noqa: BLE001 - reported to the server as Flower's simulation does
            logger.error("node %s (partition %s): %s", node_id, context.node_config[PARTITION_ID_KEY],
                         traceback.format_exc())
            ex = ClientAppException(str(ex))
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex)}:<'{ex}'>"),
                            reply_to=msg)
        set_message_id(reply.metadata, str(uuid4()))
        return reply
