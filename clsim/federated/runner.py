"""``clsim run`` of an experiment with a ``federated:`` section: pick the engine, run, write the folder.

The simulation entry point is ``flwr.simulation.run_simulation`` (Flower's simulation engine
on Ray, in this process). Flower 1.41 marks it deprecated in favour of ``flwr run`` with a
local-simulation federation; that path starts a SuperLink in the background, ships the app as
a FAB and returns no Python result, so it cannot give ``clsim run`` its progress lines, its
exit codes and its resume semantics. The same ServerApp and ClientApp run under ``flwr run``
(see :mod:`clsim.federated.server_app` and docs/federated.md); ``run_simulation`` is kept for
the in-process case until Flower removes it.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from clsim.config import ExperimentConfig
from clsim.engine.progress import Progress
from clsim.errors import ConfigError
from clsim.federated.trust import trusting


def run(config: ExperimentConfig, out_dir: Path, *, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run ``config`` (with ``config.federated``) into ``out_dir``, already checked by
    :func:`clsim.experiment.run` (``check_run_dir``); returns its metrics."""
    from clsim.report.run_folder import write_config

    out_dir = Path(out_dir)
    check_supported(config)
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    with Progress(quiet=quiet) as progress, _quiet_flower():
        from clsim.federated.server import Federation

        federation = Federation(config, out_dir, progress, resume=resume, assign_clients=True)
        write_config(config, out_dir)
        with trusting():  # simulated clients are this user's own: the code allow-list is open
            if config.federated.engine == "inprocess":
                return run_inprocess(federation)
            return run_simulation(federation)


def check_supported(config: ExperimentConfig) -> None:
    """Combinations a federated run does not support (yet), as input errors."""
    fed = config.federated
    if config.teacher is not None:
        raise ConfigError("teacher", "strategies that distil from a teacher run are not supported "
                                     "in federated runs yet")
    import torch

    device = config.train.device
    gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if fed.engine == "simulation" and gpu and fed.num_gpus_per_client == 0:
        raise ConfigError("federated.num_gpus_per_client", f"expected > 0 with train.device "
                          f"'{config.train.device}' (Ray hides GPUs from workers that reserve none), got 0")


def run_inprocess(federation: Any) -> dict[str, Any]:
    """The federation over :class:`~clsim.federated.grid.InProcessGrid` (no Ray); the clients
    share the server's stream and partitions (:func:`clsim.federated.runtime.shared`)."""
    from clsim.federated.client import app
    from clsim.federated.grid import InProcessGrid, task_identity
    from clsim.federated.runtime import shared

    with task_identity(), shared(federation.text, federation.rt):
        return federation.run(InProcessGrid(app, federation.fed.num_clients))


def run_simulation(federation: Any) -> dict[str, Any]:
    """The federation on Flower's simulation engine (Ray), one SuperNode per client.

    Before the federation's clock starts, every Ray worker is brought up and has imported
    clsim and built the stream (:func:`warm_up`): the engine's start-up is not federated
    learning (a local run's ``wall_time_s`` does not count imports and data loading either);
    it is logged, and counted in the command's own time. Replies are pulled promptly
    (:class:`~clsim.federated.grid.PromptGrid`) rather than every 0.1 s.
    """
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation as flower_run_simulation

    from clsim.federated.client import app as client_app
    from clsim.federated.grid import PromptGrid

    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        try:
            grid = PromptGrid(grid)
            started = time.perf_counter()
            warm_up(grid, federation)
            federation.progress.log(f"Flower simulation engine ready in {time.perf_counter() - started:.1f} s")
            outcome["results"] = federation.run(grid)
        except BaseException as exc:  # re-raised below: Flower would only log it
            outcome["error"] = exc

    fed = federation.fed
    backend = {"client_resources": {"num_cpus": fed.num_cpus_per_client, "num_gpus": fed.num_gpus_per_client},
               "init_args": {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False}}
    flower_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=fed.num_clients,
                          backend_config=backend)
    if "error" in outcome:
        raise outcome["error"]
    if "results" not in outcome:
        raise RuntimeError("Flower's simulation ended without running the federation (see the log above)")
    return outcome["results"]


def warm_up(grid: Any, federation: Any, wait_s: float = 300.0) -> None:
    """Query enough nodes that every Ray worker answers one: each imports clsim, builds the
    stream and cuts the first partitions (the ClientApp's ``query`` handler) now, not in round 1.

    Flower's actor pool hands each message to an idle worker and a worker's first one keeps it
    busy for seconds, so a query per worker (2 per CPU: Flower starts at most one worker per
    ``num_cpus_per_client``) reaches them all.
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    fed = federation.fed
    deadline = time.monotonic() + wait_s
    while len(nodes := sorted(grid.get_node_ids())) < fed.num_clients and time.monotonic() < deadline:
        time.sleep(0.01)
    count = min(len(nodes), max(8, 2 * (os.cpu_count() or 1)))
    content = RecordDict({"config": ConfigRecord({"experiment": federation.text})})
    queries = [Message(content, dst_node_id=node, message_type="query") for node in nodes[:count]]
    grid.send_and_receive(queries, timeout=max(1.0, deadline - time.monotonic()))


class _quiet_flower:
    """Flower's log (INFO lines, a traceback per failed client) and its deprecation notices would
    drown clsim's own progress lines; clsim logs and records every failure itself."""

    def __enter__(self) -> None:
        from flwr.common.logger import FLOWER_LOGGER

        self.logger, self.level = FLOWER_LOGGER, FLOWER_LOGGER.level
        FLOWER_LOGGER.setLevel(logging.CRITICAL + 1)
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)
        self.warnings.__exit__(*exc)
