"""Client fleets: tiers of heterogeneous devices, and the simulated clock of a round.

A fleet profile (``clients/*.yaml``) lists tiers; each tier has a share of the clients, a
compute speed, link bandwidths, availability, a mid-round dropout probability, a model size
ratio (read by sub-model server strategies such as FedConv) and fault-injection options.
Everything random here is a pure function of ``(seed, step, client)``, so a resumed run draws
the same clients, the same dropouts and the same faults as an uninterrupted one.

No Flower and no torch: the server and every client evaluate the same draws.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clsim.errors import ConfigError
from clsim.seeds import FLEET_TIERS

FAULTS = ("raise", "hang", "drop")


@dataclass(frozen=True)
class Tier:
    """One kind of device in a fleet."""

    name: str
    """Tier name, e.g. 'phone'."""
    share: float
    """Fraction of the fleet's clients in this tier; shares sum to 1."""
    gflops: float = 10.0
    """Sustained training throughput, GFLOP/s: simulated compute time = FLOPs of the local work / this."""
    up_mbps: float = 10.0
    """Upload bandwidth, megabit/s."""
    down_mbps: float = 50.0
    """Download bandwidth, megabit/s."""
    latency_s: float = 0.0
    """Fixed per-round overhead (connection set-up, scheduling), seconds."""
    availability: float = 1.0
    """Probability that the client is online when a round samples clients."""
    dropout: float = 0.0
    """Probability that a sampled client drops mid-round (after the download, no upload)."""
    model_size_ratio: float = 1.0
    """Width ratio r of the sub-model this tier can hold (1 = the full model; FedConv, HeteroFL)."""
    fail_prob: float = 0.0
    """Fault injection: probability that the client raises an exception during a round."""
    hang_prob: float = 0.0
    """Fault injection: probability that the client hangs for ``hang_s`` real seconds."""
    hang_s: float = 0.0
    """Fault injection: how long a hanging client sleeps (pair with ``federated.round_timeout_s``)."""

    def __post_init__(self) -> None:
        for key in ("share", "availability", "dropout", "fail_prob", "hang_prob"):
            value = getattr(self, key)
            _check(f"tiers.{self.name}.{key}", 0.0 <= value <= 1.0, "a number in [0, 1]", value)
        for key in ("gflops", "up_mbps", "down_mbps"):
            value = getattr(self, key)
            _check(f"tiers.{self.name}.{key}", value > 0, "a number > 0", value)
        for key in ("latency_s", "hang_s"):
            value = getattr(self, key)
            _check(f"tiers.{self.name}.{key}", value >= 0, "a number >= 0", value)
        r = self.model_size_ratio
        _check(f"tiers.{self.name}.model_size_ratio", 0 < r <= 1, "a number in (0, 1]", r)

    def round_time(self, *, flops: float, bytes_down: int, bytes_up: int) -> float:
        """Simulated seconds of one round: download, local compute, upload, plus latency."""
        down = 8 * bytes_down / (self.down_mbps * 1e6)
        up = 8 * bytes_up / (self.up_mbps * 1e6)
        return self.latency_s + down + flops / (self.gflops * 1e9) + up


@dataclass(frozen=True)
class Fleet:
    """Tiers of devices; clients are assigned to tiers by share (see :meth:`assign`)."""

    name: str = "uniform"
    tiers: tuple[Tier, ...] = field(default_factory=lambda: (Tier(name="default", share=1.0),))
    path: str | None = field(default=None, compare=False)  # provenance only: to_dict inlines the tiers

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ConfigError("federated.fleet.tiers", "expected at least one tier")
        total = sum(t.share for t in self.tiers)
        _check("tiers.share", abs(total - 1.0) < 1e-6, "shares summing to 1", round(total, 6))
        names = [t.name for t in self.tiers]
        _check("tiers.name", len(set(names)) == len(names), "distinct tier names", names)

    def assign(self, num_clients: int, seed: int) -> list[Tier]:
        """The tier of each client 0..N-1: counts by largest remainder, clients shuffled by ``seed``."""
        shares = np.array([t.share for t in self.tiers])
        counts = np.floor(shares * num_clients).astype(int)
        order = np.argsort(-(shares * num_clients - counts), kind="stable")
        counts[order[: num_clients - counts.sum()]] += 1
        labels = np.repeat(np.arange(len(self.tiers)), counts)
        labels = labels[np.random.default_rng([seed, FLEET_TIERS]).permutation(num_clients)]
        return [self.tiers[k] for k in labels]

    def to_dict(self) -> dict[str, Any]:
        """Inline form for the resolved ``config.yaml`` (so a rerun needs no fleet file)."""
        return {"name": self.name, "tiers": [dataclasses.asdict(t) for t in self.tiers]}


def load_fleet(spec: Any, base_dir: Path | None) -> Fleet:
    """A :class:`Fleet` from a path to a ``clients/*.yaml`` profile, an inline mapping, or None."""
    if spec is None:
        return Fleet()
    if isinstance(spec, str):
        return Fleet(**_parse(_read(spec, base_dir), spec) | {"path": spec})
    if isinstance(spec, dict):
        return Fleet(**_parse(spec, "federated.fleet"))
    raise ConfigError("federated.fleet", f"expected a path to a fleet profile or a mapping, got {spec!r}")


def _read(spec: str, base_dir: Path | None) -> dict[str, Any]:
    from clsim.config.parse import read_yaml

    for root in (Path.cwd(), base_dir, base_dir.parent if base_dir else None):
        if root is not None and (root / spec).is_file():
            return read_yaml(root / spec)
    raise ConfigError("federated.fleet", f"fleet profile '{spec}' not found (looked in the working "
                                         f"directory and next to the config); see clients/*.yaml")


def _parse(raw: dict[str, Any], where: str) -> dict[str, Any]:
    from clsim.config.parse import parse_dataclass

    unknown = set(raw) - {"name", "tiers", "description"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown key; known: name, tiers, description")
    tiers = raw.get("tiers")
    if not isinstance(tiers, list) or not tiers:
        raise ConfigError(f"{where}.tiers", "expected a list of tiers, each with a name and a share")
    try:
        parsed = tuple(parse_dataclass(f"{where}.tiers[{i}]", t, Tier) for i, t in enumerate(tiers))
        return {"name": str(raw.get("name", "fleet")), "tiers": parsed}
    except TypeError as exc:  # a missing required field (name, share)
        raise ConfigError(f"{where}.tiers", f"each tier needs a name and a share ({exc})") from None


def _check(path: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"federated.fleet.{path}", f"expected {expected}, got {value!r}")


def draw(seed: int, step: int, client: int, what: str) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step, client, what)."""
    code = sum(ord(c) * 31**i for i, c in enumerate(what)) % 2**31
    return float(np.random.default_rng([seed, step, client, code]).random())


def injected_fault(tier: Tier, *, seed: int, step: int, client: int) -> str | None:
    """The fault a client suffers in a training round, if any: 'drop', 'raise', 'hang' or None.

    A fault of probability 0 is not drawn at all (each draw is its own stream, so skipping one
    changes no other): a draw costs ~40 us, three per client per round.
    """
    for fault, p, what in (("drop", tier.dropout, "dropout"), ("raise", tier.fail_prob, "fail"),
                           ("hang", tier.hang_prob, "hang")):
        if p > 0 and draw(seed, step, client, what) < p:
            return fault
    return None


def online(tier: Tier, *, seed: int, step: int, client: int) -> bool:
    """Whether the client is reachable when round ``step`` samples clients (always, for an
    availability of 1: no draw, which every client would cost every round)."""
    return tier.availability >= 1.0 or draw(seed, step, client, "online") < tier.availability
