"""What the server and every client rebuild from the experiment config: the stream and its partitions.

A client receives the resolved config (YAML text) in every message and rebuilds the scenario
from it once per process (:func:`runtime` is cached), so the same ClientApp runs in Flower's
simulation engine, in-process, and on real SuperNodes, with nothing but Flower messages in
between. Partitions are a pure function of (config, experience, split): server and clients
compute the same ones.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import yaml

from clsim.config import ExperimentConfig, parse_config
from clsim.data.base import View
from clsim.seeds import CLIENT_ORDER, PARTITION, PUBLIC_SPLIT, derive_seed
from clsim.federated.config import FederatedConfig
from clsim.federated.fleet import Tier
from clsim.federated.partition import mirror
from clsim.scenarios.base import Experience, Scenario



@dataclass
class Runtime:
    """The stream, its per-client partitions (computed lazily, cached) and the clients' tiers."""

    config: ExperimentConfig
    scenario: Scenario
    tiers: list[Tier]
    _parts: dict[tuple[int, str], list[np.ndarray]] = field(default_factory=dict)

    @property
    def fed(self) -> FederatedConfig:
        return self.config.federated

    def partition(self, index: int, split: str) -> list[np.ndarray]:
        """Index arrays (one per client) into experience ``index``'s ``split`` set."""
        key = (index, split)
        if key not in self._parts:
            data = getattr(self.scenario.experiences[index], split)
            labels = np.asarray(data.targets, dtype=np.int64)
            seed = derive_seed(self.config.seed, index, PARTITION[split]) % 2**32
            if split == "test":  # the client's own test data follows its training labels
                train = self.scenario.experiences[index].train
                train_labels = np.asarray(train.targets, dtype=np.int64)
                self._parts[key] = mirror(labels, train_labels, self.partition(index, "train"), seed)
            else:
                self._parts[key] = self._partition_clients(index, labels, seed)
        return self._parts[key]

    def _partition_clients(self, index: int, labels: np.ndarray, seed: int) -> list[np.ndarray]:
        """The partitioner over the training items the server does not hold (see :meth:`public_indices`)."""
        if not self.fed.public_fraction:
            return self.fed.partition.build(labels, self.fed.num_clients, seed)
        rest = np.setdiff1d(np.arange(len(labels)), self.public_indices(index))
        return [rest[part] for part in self.fed.partition.build(labels[rest], self.fed.num_clients, seed)]

    def public_indices(self, index: int) -> np.ndarray:
        """Items of experience ``index``'s training set held by the server, never given to a client:
        ``floor(public_fraction * n)`` of every class of ``n`` items. Rounding down, a class with
        fewer than ``1 / public_fraction`` items (a long tail's) stays wholly with the clients;
        rounding up would take half or all of a one- or two-item class from them."""
        key = (index, "public")
        if key not in self._parts:
            labels = np.asarray(self.scenario.experiences[index].train.targets, dtype=np.int64)
            rng = np.random.default_rng(derive_seed(self.config.seed, index, PUBLIC_SPLIT) % 2**32)
            held = []
            for c in np.unique(labels):
                items = np.nonzero(labels == c)[0]
                # + 1e-9: 0.29 * 100 is 28.999999999999996 in floats, and 29 is meant
                take = math.floor(self.fed.public_fraction * len(items) + 1e-9)
                held.append(rng.permutation(items)[:take])
            self._parts[key] = [np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)]
        return self._parts[key][0]

    def public(self, index: int) -> View:
        """The server's held-out part of experience ``index``'s training set."""
        return View(self.scenario.experiences[index].train, self.public_indices(index))

    def order(self, client: int) -> list[int]:
        """The experiences in the order ``client`` meets them (``federated.class_order``)."""
        T = len(self.scenario)
        if self.fed.class_order == "shared":
            return list(range(T))
        return [int(i) for i in np.random.default_rng([self.config.seed, client, CLIENT_ORDER]).permutation(T)]

    def head_size(self, step: int) -> int:
        """Classes of the global head at stream step ``step``: seen so far, or all (per-client orders)."""
        if self.fed.class_order == "shared":
            return self.scenario.seen_classes(step)
        return self.scenario.num_classes

    def client_experience(self, client: int, index: int) -> Experience:
        """Experience ``index`` as client ``client`` sees it: its partitions of train and test."""
        exp = self.scenario.experiences[index]
        train = View(exp.train, self.partition(index, "train")[client])
        test = View(exp.test, self.partition(index, "test")[client])
        return Experience(exp.index, exp.classes, train, test)

    def stream_id(self, client: int, index: int, round_in_experience: int) -> int:
        """The engine's seed stream for one client's local training in one round.

        Unique per (experience, round, client); client 0's first round of experience i uses
        stream i, the local run's, so a one-client federation reproduces local training.
        """
        T, R = len(self.scenario), self.fed.rounds_per_experience
        return index + T * (round_in_experience + R * client)


def config_text(config: ExperimentConfig) -> str:
    """The resolved config as the YAML text that travels in messages."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


_SHARED: dict[str, Runtime] = {}


def runtime(text: str) -> Runtime:
    """The :class:`Runtime` of ``text`` (a resolved config): the one :func:`shared` lends in this
    process, else parsed and built once per process (cached)."""
    lent = _SHARED.get(text)
    return lent if lent is not None else _built(text)


@functools.lru_cache(maxsize=4)
def _built(text: str) -> Runtime:
    return build_runtime(parse_config(yaml.safe_load(text)))


@contextlib.contextmanager
def shared(text: str, rt: Runtime) -> Iterator[None]:
    """Clients in this process use the server's ``rt`` for ``text`` (the in-process grid).

    The server has already loaded the data and cut every experience's partitions; a client
    building its own copy from the same config would redo both (about a second on the digits
    scenario) for the same arrays: partitions are a pure function of the config.
    """
    _SHARED[text] = rt
    try:
        yield
    finally:
        _SHARED.pop(text, None)


def build_runtime(config: ExperimentConfig) -> Runtime:
    """The :class:`Runtime` of a parsed config (builds the source and the scenario)."""
    source = config.data.build() if config.data is not None else None  # None: the scenario brings its data
    scenario = config.scenario.build(source, config.seed)
    tiers = config.federated.fleet.assign(config.federated.num_clients, config.seed)
    return Runtime(config, scenario, tiers)
