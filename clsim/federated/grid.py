"""An in-process stand-in for Flower's ``Grid``: the same ClientApp, called here, one node at a time.

``backend: inprocess`` runs a federation without Ray: no start-up cost, one process, easy to
debug, and what the fast tests use. Messages, Contexts and replies are Flower's own; a client
that raises becomes an error reply, as in the simulation engine. What it cannot show is
parallelism and real time-outs (a hanging client simply delays the round).
"""

from __future__ import annotations

import contextlib
import time
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


class PromptGrid:
    """A Flower ``Grid`` whose ``send_and_receive`` looks for replies soon after they arrive.

    Flower's in-memory grid (the simulation engine's) pulls replies every 0.1 s, so every
    exchange costs up to 0.1 s on top of the clients' work: 20 exchanges of a 15-round run,
    2 s. This pulls through the grid's own ``push_messages`` / ``pull_messages`` instead,
    first after ``first_s``, then backing off by ``growth`` up to ``max_s`` while nothing
    arrives (and again from ``first_s`` after each reply), so a round ends within a few
    milliseconds of its last reply and an idle wait costs ~20 cheap pulls a second.
    Everything else is the wrapped grid's.
    """

    def __init__(self, grid: Any, *, first_s: float = 0.002, max_s: float = 0.05, growth: float = 1.5):
        self.grid, self.first_s, self.max_s, self.growth = grid, first_s, max_s, growth

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages``, then pull until every one has a reply or ``timeout`` seconds passed."""
        pending = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = self.first_s
        while pending:
            arrived = list(self.grid.pull_messages(pending))
            replies += arrived
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            wait = self.first_s if arrived else min(wait * self.growth, self.max_s)
            time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
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
