"""Federated continual learning on Flower: a ``federated:`` section turns any experiment into a federation.

Every client is a Flower ClientApp (:mod:`clsim.federated.client`) whose local work is clsim's
engine with the configured CL strategy on its partition of the current experience; the server
(:mod:`clsim.federated.server`) drives experiences x rounds with a server strategy from
:data:`clsim.registry.SERVER_STRATEGIES` (Flower's FedAvg, FedProx, ...). Fleets of
heterogeneous clients (:mod:`clsim.federated.fleet`) give each round a simulated duration,
stragglers and faults. See docs/federated.md.

Importing this package is cheap (no Flower, no torch); :func:`run` loads the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clsim.federated.base import FlowerStrategy, ServerStrategy

__all__ = ["FlowerStrategy", "ServerStrategy", "run"]


def run(config: Any, out_dir: Path, *, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run a federated experiment into ``out_dir`` (see :func:`clsim.federated.runner.run`)."""
    from clsim.federated.runner import run as _run

    return _run(config, out_dir, resume=resume, quiet=quiet)
