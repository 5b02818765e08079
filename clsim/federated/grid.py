"""An in-process stand-in for Flower's ``Grid``: the same ClientApp, called here, one node at a time.

``backend: inprocess`` runs a federation without Ray: no start-up cost, one process, easy to
debug, and what the fast tests use. Messages, Contexts and replies are Flower's own; a client
that raises becomes an error reply, as in the simulation engine. What it cannot show is
parallelism and real time-outs (a hanging client simply delays the round).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 0
CLIENT_ERROR = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION


class InProcessGrid:
    """Nodes 1..N hold partitions 0..N-1 and answer through ``client_app``.

    Args:
        client_app: a ``flwr.clientapp.ClientApp``.
        num_nodes: how many nodes (clients).
        node_config: extra node config for every node (``partition-id`` is set per node).
    """

    def __init__(self, client_app: Any, num_nodes: int, node_config: dict[str, Any] | None = None):
        self.app = client_app
        self.contexts = {
            k + 1: Context(run_id=1, node_id=k + 1, state=RecordDict(), run_config={},
                           node_config={"partition-id": k, "num-partitions": num_nodes, **(node_config or {})})
            for k in range(num_nodes)
        }

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Deliver each message to its node's ClientApp in turn; exceptions become error replies."""
        replies = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            try:
                reply = self.app(message, context)
            except Exception as exc:  # noqa: BLE001 - a failing client never stops the run
                reply = Message(Error(code=CLIENT_ERROR, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
            replies.append(reply)
        return replies


@contextlib.contextmanager
def task_identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity, which only its runtimes set."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SERVER_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
