"""The Flower ServerApp for Flower's deployment engine (``flwr run`` against a SuperLink).

``clsim run`` drives the simulation itself (:mod:`clsim.federated.runner`); on a real
federation Flower runs this ``app`` and the same ClientApp (:data:`clsim.federated.client.app`)
on every SuperNode. The run config names the experiment file and the run folder::

    python -m clsim.federated.server_app flower_app/      # writes flower_app/pyproject.toml
    flwr run flower_app/ local --stream \\
        --run-config "config='/abs/scenarios/fed_digits.yaml' out='/abs/runs/fed_real'"

Each SuperNode holds one client: ``--node-config "partition-id=K num-partitions=N"``, and
optionally ``state-dir='/path'`` for where it keeps its CL strategy state (default: the run
folder's ``federated/clients``, which suits nodes on one machine). See docs/federated.md.
"""

from __future__ import annotations

import os
import shlex
import sys
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
"""


@app.main()
def main(grid: Any, context: Any) -> None:
    """Run the experiment named by the run config over the connected SuperNodes."""
    from clsim.config import load_config
    from clsim.engine.progress import Progress
    from clsim.errors import ConfigError
    from clsim.experiment import check_run_dir, write_config
    from clsim.federated.server import Federation

    cfg = context.run_config
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
        federation.run(grid)


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
