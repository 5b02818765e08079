"""The Flower ServerApp for Flower's deployment engine (``flwr run`` against a SuperLink).

``clsim run`` drives the simulation itself (:mod:`clsim.federated.runner`); on a real
federation Flower runs this ``app`` and the same ClientApp (:data:`clsim.federated.client.app`)
on every SuperNode. The run config names the experiment file and the run folder::

    python -m clsim.federated.server_app flower_app/      # writes flower_app/pyproject.toml
    flwr run flower_app/ local --stream \\
        --run-config "config='/abs/scenarios/fed_digits.yaml' out='/abs/runs/fed_real'"

Each SuperNode holds one client: ``--node-config "partition-id=K num-partitions=N"``, and
optionally ``state-dir='/path'`` for where it keeps its CL strategy state (default: the run
folder's ``federated/clients``, which suits nodes on one machine). Run it with
``--isolation process`` and :mod:`clsim.federated.worker` beside it, which keeps its ClientApp
loaded between messages; this app polls for replies every ``poll-s`` seconds
(:class:`PollingGrid`). See docs/federated.md, "On Flower's deployment engine".
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.serverapp import ServerApp

app = ServerApp()

APP_PYPROJECT = """\
# A Flower app that runs clsim experiments with a `federated:` section on a real federation.
# Written by `python -m clsim.federated.server_app DIR`; clsim itself must be installed on the
# SuperLink's and every SuperNode's Python environment.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "clsim-federation"
version = "1.0.0"
description = "clsim experiments with a federated section, as a Flower app"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "clsim"

[tool.flwr.app.components]
serverapp = "clsim.federated.server_app:app"
clientapp = "clsim.federated.client:app"

[tool.flwr.app.config]
config = ""          # the experiment YAML (absolute path), with a `federated:` section
out = ""             # the run folder (absolute path); default runs/<name>
set = ""             # overrides, ';'-separated: "train.epochs=1;federated.rounds_per_experience=1"
resume = false       # continue the run in `out` from its last checkpoint
poll-s = 0.05        # seconds between the server's polls for replies (Flower's own grid: 3 s)
"""

POLL_S = 0.05


class PollingGrid:
    """A Flower ``Grid`` whose ``send_and_receive`` polls for replies every ``poll_s`` seconds.

    The deployment engine's grid (``flwr.superlink.grid.HttpGrid.send_and_receive``, Flower
    1.42) sleeps 3 s between its pulls for replies, so a round waited up to 3 s after its last
    reply had arrived. This pushes and pulls with the grid's own ``push_messages`` /
    ``pull_messages`` at a shorter interval (one HTTP request to the SuperLink each).
    Everything else is the wrapped grid's.
    """

    def __init__(self, grid: Any, poll_s: float = POLL_S):
        self._grid, self.poll_s = grid, poll_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        """Push ``messages``; pull replies until all arrived or ``timeout`` seconds passed."""
        pending = set(self._grid.push_messages(list(messages))) - {None, ""}
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Any] = []
        while pending:
            arrived = list(self._grid.pull_messages(list(pending)))
            replies += arrived
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll_s if end is None else max(0.0, min(self.poll_s, end - time.monotonic())))
        return replies


@app.main()
def main(grid: Any, context: Any) -> None:
    """Run the experiment named by the run config over the connected SuperNodes."""
    from clsim.config import load_config
    from clsim.engine.progress import Progress
    from clsim.errors import ConfigError
    from clsim.report.run_folder import check_run_dir, write_config
    from clsim.federated.server import Federation

    cfg = context.run_config
    poll_s = poll_seconds(cfg)
    if not cfg.get("config"):
        raise ConfigError("run_config.config", "missing: the experiment file (--run-config \"config='/abs/x.yaml'\")")
    overrides = [s for s in str(cfg.get("set", "")).split(";") if s.strip()]
    config = load_config(str(cfg["config"]), overrides)
    if config.federated is None:
        raise ConfigError(str(cfg["config"]), "has no 'federated' section")
    out = Path(str(cfg.get("out") or Path("runs") / config.name))
    resume = bool(cfg.get("resume", False))
    check_run_dir(config, out, resume=resume)
    with Progress(quiet=False) as progress:
        federation = Federation(config, out, progress, resume=resume)
        write_config(config, out)
        federation.run(PollingGrid(grid, poll_s))


def poll_seconds(cfg: Any) -> float:
    """The run config's ``poll-s``: a positive number of seconds."""
    from clsim.errors import ConfigError

    try:
        value = float(cfg.get("poll-s", POLL_S))
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value <= 60:
        raise ConfigError("run_config.poll-s", f"expected seconds in (0, 60], got {cfg.get('poll-s')!r}")
    return value


def write_app_dir(path: str | os.PathLike) -> Path:
    """Write the Flower app directory (its ``pyproject.toml``) that ``flwr run`` takes."""
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    (target / "pyproject.toml").write_text(APP_PYPROJECT)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m clsim.federated.server_app APP_DIR  (writes APP_DIR/pyproject.toml)")
    print(f"wrote {shlex.quote(str(write_app_dir(sys.argv[1]) / 'pyproject.toml'))}")
