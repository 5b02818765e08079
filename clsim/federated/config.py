"""The ``federated:`` section of an experiment file, typed and validated (no Flower needed).

::

    federated:
      num_clients: 8
      clients_per_round: 4          # or fraction: 0.5
      rounds_per_experience: 3
      local_epochs: 2               # default: train.epochs
      partition: {name: dirichlet, alpha: 0.5}   # iid | dirichlet | shards
      server: {name: fedprox, mu: 0.01}          # clsim list server_strategies
      fleet: clients/edge_fleet.yaml             # or an inline {name, tiers}; default: one ideal tier
      round_deadline_s: 30          # simulated seconds; later replies are stragglers, dropped
      round_timeout_s: null         # real seconds the server waits for replies (hung clients)
      backend: auto                 # inprocess | simulation (Flower's engine, Ray) | auto: inprocess
                                    # unless the run needs real time-outs (see FederatedConfig.engine)
      public_fraction: 0.05         # training data the server holds out (default: 0.05 for fedconv, else 0)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from clsim.errors import ConfigError
from clsim.federated.fleet import Fleet, load_fleet


SMOKE_PUBLIC_FRACTION = 0.125
"""Smallest ``public_fraction`` of a smoke run (:meth:`FederatedConfig.smoke`) that holds any public data."""


@dataclass(frozen=True)
class FederatedConfig:
    """How an experiment's stream is learnt by a federation of clients."""

    num_clients: int = 4
    """Simulated clients (Flower SuperNodes); client k holds partition k of every experience."""
    clients_per_round: int | None = None
    """Clients sampled per round (from those online); give this or ``fraction``."""
    fraction: float | None = None
    """Fraction of ``num_clients`` sampled per round (default 1.0 when neither is given)."""
    rounds_per_experience: int = 2
    """Federated rounds on each experience before the stream moves on."""
    local_epochs: int | None = None
    """Epochs each sampled client trains per round (default: ``train.epochs``)."""
    class_order: Literal["shared", "per_client"] = "shared"
    """'shared': every client meets the experiences in the stream's order. 'per_client': each
    client meets them in its own random order (asynchronous task arrival): at step t client k
    trains on experience order_k[t]; the global head holds all classes from the start and the
    global model is evaluated on every experience after each step (a full accuracy matrix)."""
    round_deadline_s: float | None = None
    """Simulated seconds a round waits; clients whose simulated time exceeds it are stragglers
    and their updates are dropped (null: no deadline)."""
    round_timeout_s: float | None = None
    """Real seconds the server waits for replies; a client that has not replied by then is
    recorded as timed out (null: wait for every reply)."""
    backend: Literal["auto", "inprocess", "simulation"] = "auto"
    """'inprocess': the same Flower ClientApp, Messages and Contexts, called in this process one
    client at a time (no start-up, no parallelism, no real time-outs); 'simulation': Flower's
    simulation engine (Ray: clients in parallel worker processes, real time-outs, ~20-30 s of
    start-up on 2 cores); 'auto': :attr:`engine` picks. Seconds per round against clients per
    round for both: ``benchmarks/federated.py --parts per_round`` and docs/federated.md."""
    num_cpus_per_client: float = 1.0
    """CPUs per client: Ray's resources per simulated client (2 cores -> 2 clients train at a
    time) and torch's threads in every client, whatever the engine (so they compute alike)."""
    num_gpus_per_client: float = 0.0
    """Ray GPUs per simulated client (e.g. 0.25: four clients share a GPU); needed for
    ``train.device: cuda`` on the simulation engine, which hides GPUs from CPU-only workers."""
    eval_every_round: bool = True
    """Evaluate the global model on all seen test sets after every round (else per experience)."""
    public_fraction: float | None = None
    """Fraction of every experience's training data held by the server and never given to a
    client (``floor(fraction * n)`` of each class of n items, so a class of fewer than
    1 / fraction items stays wholly with the clients; the test sets are untouched). Server strategies that learn on
    the server (``fedconv``) use it; default 0.05 for those, else 0. Set it explicitly to give
    every strategy in a comparison the same client data."""
    partition: Any = None
    """Section of :data:`~clsim.registry.PARTITIONERS` (default ``{name: iid}``)."""
    server: Any = None
    """Section of :data:`~clsim.registry.SERVER_STRATEGIES` (default ``{name: fedavg}``)."""
    fleet: Fleet = dataclasses.field(default_factory=Fleet)
    """Client fleet profile (``clients/*.yaml``); default: one ideal tier, always online."""

    def __post_init__(self) -> None:
        n = self.num_clients
        _require("num_clients", n >= 1, "an int >= 1", n)
        if self.clients_per_round is not None and self.fraction is not None:
            raise ConfigError("federated.fraction", "give either clients_per_round or fraction, not both")
        if self.clients_per_round is not None:
            k = self.clients_per_round
            _require("clients_per_round", 1 <= k <= n, f"an int in [1, {n}] (num_clients)", k)
        if self.fraction is not None:
            _require("fraction", 0 < self.fraction <= 1, "a number in (0, 1]", self.fraction)
        _require("rounds_per_experience", self.rounds_per_experience >= 1, "an int >= 1",
                 self.rounds_per_experience)
        if self.local_epochs is not None:
            _require("local_epochs", self.local_epochs >= 1, "an int >= 1 or null", self.local_epochs)
        for key in ("round_deadline_s", "round_timeout_s"):
            value = getattr(self, key)
            _require(key, value is None or value > 0, "a number > 0 or null", value)
        _require("num_cpus_per_client", self.num_cpus_per_client > 0, "a number > 0", self.num_cpus_per_client)
        _require("num_gpus_per_client", 0 <= self.num_gpus_per_client <= 1, "a number in [0, 1]",
                 self.num_gpus_per_client)
        if self.public_fraction is not None:
            _require("public_fraction", 0 <= self.public_fraction < 0.5, "a number in [0, 0.5)", self.public_fraction)

    @property
    def engine(self) -> str:
        """The engine that runs the federation: ``backend``, or for 'auto' the in-process grid
        unless the run needs real time-outs (``round_timeout_s`` set, or a fleet tier that
        hangs), which only Flower's simulation engine enforces.

        In-process is the default because on the machines clsim is measured on its rounds cost no
        more than the simulation engine's, and it has no start-up: a 4-client, 15-round run
        costs ~1.3x its local counterpart in-process, against ~10x end to end on Ray
        (benchmarks/federated.py). Choose 'simulation' for many cores and clients whose local
        work dwarfs ~30 ms a message.
        """
        if self.backend != "auto":
            return self.backend
        hangs = any(tier.hang_prob > 0 for tier in self.fleet.tiers)
        return "simulation" if self.round_timeout_s is not None or hangs else "inprocess"

    @property
    def sample_size(self) -> int:
        """How many clients a round samples."""
        if self.clients_per_round is not None:
            return self.clients_per_round
        return max(1, round((self.fraction or 1.0) * self.num_clients))

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able data; parsing it again gives an equal config."""
        scalars = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name not in ("partition", "server", "fleet")}
        return scalars | {"partition": self.partition.to_dict(), "server": self.server.to_dict(),
                          "fleet": self.fleet.to_dict()}

    def smoke(self) -> FederatedConfig:
        """A copy shrunk for a smoke run: 2 clients, 1 round per experience, 1 local epoch, and
        the in-process grid (the same ClientApp and server, without Ray's ~10-20 s start-up)."""
        n = min(self.num_clients, 2)
        # the server holds floor(fraction * n) of a class's n items: keep a public set of 2 of a
        # smoke run's 16 images per class (clsim.config.smoke), where 5% would round to none
        public = max(self.public_fraction, SMOKE_PUBLIC_FRACTION) if self.public_fraction else self.public_fraction
        return dataclasses.replace(self, num_clients=n, clients_per_round=None, fraction=None,
                                   rounds_per_experience=1, local_epochs=1, backend="inprocess",
                                   public_fraction=public)


def parse_federated(raw: Any, base_dir: Path | None = None) -> FederatedConfig:
    """Validate the ``federated`` mapping of an experiment file."""
    from clsim.config.parse import parse_dataclass, parse_section
    from clsim.registry import PARTITIONERS, SERVER_STRATEGIES

    if not isinstance(raw, dict):
        raise ConfigError("federated", f"expected a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    partition = parse_section("federated.partition", raw.pop("partition", None) or "iid", PARTITIONERS, base_dir)
    server = parse_section("federated.server", raw.pop("server", None) or "fedavg", SERVER_STRATEGIES, base_dir)
    fleet = load_fleet(raw.pop("fleet", None), base_dir)
    config = parse_dataclass("federated", raw, FederatedConfig)
    _check_server_arguments(server)
    return dataclasses.replace(config, partition=partition, server=server, fleet=fleet,
                               public_fraction=_public_fraction(config.public_fraction, server))


def _check_server_arguments(server: Any) -> None:
    """The server strategy is a :class:`~clsim.federated.base.ServerStrategy` and checks its
    arguments now (``clsim validate``, the sweep's pre-check), not after the run has loaded its
    data; constructing one needs neither Flower nor torch."""
    from clsim.federated.base import ServerStrategy

    if not (isinstance(server.factory, type) and issubclass(server.factory, ServerStrategy)):
        key = "federated.server.plugin" if server.plugin else "federated.server.name"
        raise ConfigError(key, f"expected a subclass of clsim.federated.base.ServerStrategy, got {server.factory!r}")
    server.build()


def check_with_strategy(federated: FederatedConfig, strategy: Any) -> None:
    """Checks that need the built CL strategy: FedRolex shifts every sub-model's window each round,
    so per-parameter state (EWC/L2 anchors and Fisher, SI importances) that a client saved in its
    sub-model's index space would later be applied to different global channels."""
    if federated.server.name == "fedrolex" and strategy.keeps_parameter_state:
        raise ConfigError("federated.server.name", "fedrolex rolls each client's sub-model window every round, so "
                          "the strategy's per-parameter state (anchors, importances) would point at other "
                          "channels: use heterofl or fedconv, or a strategy without it (finetune, lwf)")


def check_with_model(federated: FederatedConfig, model: Any) -> None:
    """Checks that need the experiment's ``model`` section too: a sub-model server strategy
    (HeteroFL, FedRolex, FedConv, ...) needs a model whose widths it can scale."""
    if federated.server.factory.sub_models:
        from clsim.federated.submodels import check_model

        check_model(model, federated.server.name)


def _public_fraction(value: float | None, server: Any) -> float:
    """The resolved ``public_fraction``: 0.05 by default for strategies that learn on the server."""
    learns = server.build().uses_public_data  # built: an option (e.g. ``finetune``) may turn it on
    if value is None:
        return 0.05 if learns else 0.0
    if learns and value == 0:
        raise ConfigError("federated.public_fraction", f"server strategy '{server.name}' learns on a "
                                                       f"public set held by the server: expected > 0, got 0")
    return value


def _require(key: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"federated.{key}", f"expected {expected}, got {value!r}")
