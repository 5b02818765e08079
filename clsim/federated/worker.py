"""A long-lived ClientApp process for a SuperNode in process isolation (``--isolation process``).

Flower's SuperNode hands every message to a *task*; its default SuperExec starts a fresh
``flwr-clientapp`` process per task, which imports torch and clsim and rebuilds the stream
from the config before it trains for a fraction of a second. This worker takes the
SuperExec's place on one SuperNode and runs every task in one process that stays warm:
imports once, and the stream once per experiment (:func:`clsim.federated.runtime.runtime`
is cached per process)::

    flower-supernode --isolation process --port 9101 ... &
    python -m clsim.federated.worker --runtime-api-address 127.0.0.1:9101 --insecure &

It speaks the SuperNode's Runtime API as ``flower-superexec`` and ``flwr-clientapp`` do
(acquire a task, pull its message, push the reply and the task's status), through Flower's
own client code; nothing in Flower is changed. The node decides what code runs: the worker
runs clsim's installed ClientApp (:data:`clsim.federated.client.app`) and nothing shipped
in the run's FAB, and it refuses (an error reply) a run whose app names another ClientApp.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLIENT_APP = "clsim.federated.client:app"
"""The one ClientApp this worker runs (the ``clientapp`` component of the app's pyproject)."""

log = logging.getLogger("clsim.worker")
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"
PULL_RETRY_S = 0.01
"""First retry of a message object the SuperNode has not fetched yet (doubling up to 0.25 s)."""


@dataclass
class Options:
    """How to reach the SuperNode's Runtime API."""

    address: str = "127.0.0.1:9094"
    insecure: bool = False
    root_certificates: str | None = None
    poll_s: float = 0.1
    """Seconds between task polls when idle: the latency a message waits for this worker."""
    max_tasks: int | None = None
    """Exit after this many tasks (tests); None: run until stopped."""
    auth_secret_file: str | None = None
    """The SuperNode's ``--superexec-auth-secret-file``: only a holder of it may take its tasks."""


def _client(opts: Options, *interceptors: Any, retry: bool = True) -> Any:
    """A Runtime API client (HTTP, or HTTPS verified against ``root_certificates``); ``retry``:
    with Flower's retries on connection errors (for a task's calls; the idle poll handles them)."""
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=opts.address, insecure=opts.insecure,
        root_certificates=None if opts.insecure else _read(opts.root_certificates),
        interceptors=list(interceptors), retry_invoker=make_simple_http_retry_invoker() if retry else None)


def _read(path: str | None) -> bytes | None:
    return Path(path).expanduser().read_bytes() if path else None


def _signing(opts: Options) -> list[Any]:
    """The HMAC signature the SuperNode checks on task requests when it has a shared secret."""
    if not opts.auth_secret_file:
        return []
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    secret = load_superexec_auth_secret(opts.auth_secret_file)
    return [SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_TASK})]


def acquire(client: Any) -> str | None:
    """The token of the oldest pending ClientApp task of the SuperNode, or None if there is none."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return res.token if res.HasField("task") and res.token else None


def _heartbeat(client: Any) -> Callable[[], bool]:
    """Flower's task heartbeat, except that a task the node no longer knows does not stop the
    process (Flower's ``flwr-clientapp`` raises SIGINT there: it is one process per task)."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except (httpx.TransportError, httpx.HTTPStatusError):
            return False
        return True

    return beat


def check_app(fab: Any) -> None:
    """Refuse a run whose Flower app names another ClientApp than clsim's."""
    from flwr.common.config import get_fab_config

    components = get_fab_config(fab.content).get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    named = components.get("clientapp")
    if named != CLIENT_APP:
        raise PermissionError(f"this node runs only {CLIENT_APP}; the run's app names {named!r}")


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """The task's message, context, run and FAB: ``run_clientapp.pull_task_input`` with a short
    retry interval.

    The SuperNode creates the task before it has fetched the message's objects from the
    SuperLink, so a worker that polls often finds them missing at first; Flower's default
    retry starts at 1 s (``PULL_INITIAL_BACKOFF``), which cost every message about a second here.
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message for this task from the SuperNode's Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, max_tries_per_object=None, initial_backoff=PULL_RETRY_S, backoff_cap=0.25)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: not part of the content
    return message, context, run, fab


def run_task(opts: Options, token: str, app: Any) -> tuple[str, bool]:
    """Pull the task's message, run ``app`` on it in this process, push the reply.

    Mirrors ``flwr.supernode.runtime.run_clientapp`` (Flower's per-task process) without its
    FAB installation and its process exit; a ClientApp that raises gives an error reply, as
    there. Returns the message type and whether it succeeded.
    """
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client = _client(opts, RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                     RuntimeTokenHttpInterceptor(token))
    heartbeat = HeartbeatSender(_heartbeat(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    heartbeat.start()
    try:
        message, context, _run, fab = pull_task_input(client)
        check_app(fab)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001  # the node gets an error reply, as from flwr-clientapp
        log.exception("ClientApp raised")
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            heartbeat.stop()  # before the status: the node forgets the task then
            push_task_output(client=client, context=context, sub_status=status, details=details)
            client.close()
    return (message.metadata.message_type if message is not None else "?"), status == SubStatus.COMPLETED


def serve(opts: Options, stop: threading.Event | None = None) -> int:
    """Run the SuperNode's ClientApp tasks here until ``stop`` is set; the number of tasks run."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    from clsim.federated.client import app  # the imports (torch, clsim) happen once, here

    import httpx

    stop = stop or threading.Event()
    poller = _client(opts, RuntimeVersionHttpInterceptor(component_name="SuperExec"), *_signing(opts), retry=False)
    done, away = 0, 0
    try:
        while not stop.is_set() and (opts.max_tasks is None or done < opts.max_tasks):
            try:
                token = acquire(poller)
            except httpx.TransportError as ex:  # the SuperNode is not up (yet, or any more): wait for it
                if away == 0:
                    log.info("no SuperNode at %s (%s); waiting for it", opts.address, type(ex).__name__)
                away += 1
                stop.wait(min(2.0, opts.poll_s * 2**min(away, 5)))
                continue
            if away:
                log.info("connected to the SuperNode at %s", opts.address)
                away = 0
            if token is None:
                stop.wait(opts.poll_s)
                continue
            started = time.perf_counter()
            kind, ok = run_task(opts, token, app)
            done += 1
            log.info("%s %s in %.2f s", kind, "done" if ok else "failed", time.perf_counter() - started)
    finally:
        poller.close()
    return done


def parse_args(argv: list[str] | None = None) -> Options:
    """The command line: the same connection flags as ``flwr-clientapp``."""
    parser = argparse.ArgumentParser(prog="python -m clsim.federated.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                        help="the SuperNode's Runtime API (its --port), default 127.0.0.1:9094")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperNode (loopback only)")
    tls.add_argument("--root-certificates", metavar="CA_PEM",
                     help="CA certificate that signed the SuperNode's --ssl-certfile")
    parser.add_argument("--superexec-auth-secret-file", metavar="FILE",
                        help="the shared secret the SuperNode was given (--superexec-auth-secret-file)")
    parser.add_argument("--poll-s", type=float, default=0.1, help="seconds between task polls when idle (default 0.1)")
    parser.add_argument("--max-tasks", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.poll_s > 0:
        parser.error(f"--poll-s: expected a positive number, got {args.poll_s}")
    for flag, path in (("--root-certificates", args.root_certificates),
                       ("--superexec-auth-secret-file", args.superexec_auth_secret_file)):
        if path and not Path(path).expanduser().is_file():
            parser.error(f"{flag}: no file {path}")
    return Options(args.runtime_api_address, args.insecure, args.root_certificates, args.poll_s, args.max_tasks,
                   args.superexec_auth_secret_file)


def main(argv: list[str] | None = None) -> int:
    """Entry point: serve tasks until SIGTERM / Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s clsim.worker %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API request otherwise
    opts, stop = parse_args(argv), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("serving ClientApp tasks of the SuperNode at %s", opts.address)
    serve(opts, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
