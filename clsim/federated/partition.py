"""How one experience's data is split across clients: IID, Dirichlet label skew, shards.

Each partitioner is registered in :data:`clsim.registry.PARTITIONERS`; its keyword-only
parameters are the YAML section ``federated.partition``. Positional parameters (the labels,
the number of clients, a seed) come from clsim. The work is done by ``flwr-datasets``
partitioners over an in-memory ``datasets.Dataset`` of labels and indices (no download).

A partitioning is a list of index arrays into the labels, one per client, each sorted so a
client keeps the experience's own order (a single IID client then sees exactly the
experience, and FedAvg with one client reproduces local training).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from clsim.errors import ConfigError
from clsim.registry import PARTITIONERS

Partitioning = list[np.ndarray]


def _label_dataset(labels: np.ndarray, order: np.ndarray | None = None):
    """A ``datasets.Dataset`` with columns ``label`` and ``idx`` (position in ``labels``)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - the federated extra is missing
        raise ConfigError("federated", "needs Flower: pip install 'clsim[federated]'") from None
    idx = np.arange(len(labels)) if order is None else order
    return datasets.Dataset.from_dict({"label": labels[idx].tolist(), "idx": idx.tolist()})


def _split(partitioner, labels: np.ndarray, num_partitions: int, order: np.ndarray | None = None) -> Partitioning:
    partitioner.dataset = _label_dataset(labels, order)
    try:
        return [np.sort(np.asarray(partitioner.load_partition(k)["idx"], dtype=np.int64))
                for k in range(num_partitions)]
    except ValueError as exc:  # e.g. more clients than items: the user's numbers, not a bug
        raise ConfigError("federated.partition", f"cannot split {len(labels)} items over "
                                                 f"{num_partitions} clients: {exc}") from None


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_partitions: int, seed: int, /) -> Partitioning:
    """IID: a random permutation cut into equal parts (flwr-datasets ``IidPartitioner``)."""
    from flwr_datasets.partitioner import IidPartitioner

    # IidPartitioner cuts contiguous shards, so shuffle first.
    order = np.random.default_rng(seed).permutation(len(labels))
    if num_partitions > len(labels):  # IidPartitioner cannot leave a client empty; same cut, by hand
        return [np.sort(part) for part in np.array_split(order, num_partitions)]
    return _split(IidPartitioner(num_partitions=num_partitions), labels, num_partitions, order)


@PARTITIONERS.register("dirichlet")
def dirichlet(
    labels: np.ndarray, num_partitions: int, seed: int, /, *,
    alpha: float = 0.5, min_partition_size: int = 0, self_balancing: bool = False,
) -> Partitioning:
    """Label skew: each class is spread over clients by proportions ~ Dirichlet(alpha) (Hsu et al. 2019).

    Args:
        alpha: concentration; small alpha (0.1) gives each client few classes, large (100) is near IID.
        min_partition_size: redraw until every client has at least this many items (0: never).
        self_balancing: stop giving a class to clients that already hold more than the average.
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    if alpha <= 0:
        raise ConfigError("federated.partition.alpha", f"expected a number > 0, got {alpha}")
    if min_partition_size * num_partitions > len(labels):
        raise ConfigError("federated.partition.min_partition_size",
                          f"expected at most {len(labels) // num_partitions} for {len(labels)} "
                          f"items over {num_partitions} clients, got {min_partition_size}")
    part = DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                min_partition_size=min_partition_size, self_balancing=self_balancing,
                                seed=seed)
    return _split(part, labels, num_partitions)


@PARTITIONERS.register("shards")
def shards(
    labels: np.ndarray, num_partitions: int, seed: int, /, *,
    classes_per_client: int = 2,
    assignment: Literal["random", "deterministic", "first-deterministic"] = "first-deterministic",
) -> Partitioning:
    """Pathological non-IID: each client holds ``classes_per_client`` classes (McMahan et al. 2017).

    Uses flwr-datasets' ``PathologicalPartitioner``; a class held by no client is left out
    ('first-deterministic', the default, gives every class to at least one client when there
    are at least as many clients as classes).

    Args:
        classes_per_client: k, the classes each client holds (at most the experience's classes).
        assignment: how classes are dealt: 'random', 'deterministic' (client i gets classes
            i..i+k-1) or 'first-deterministic' (the first class deterministic, the rest random).
    """
    from flwr_datasets.partitioner import PathologicalPartitioner

    present = len(np.unique(labels))
    if not 1 <= classes_per_client:
        raise ConfigError("federated.partition.classes_per_client", f"expected an int >= 1, got {classes_per_client}")
    part = PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                   num_classes_per_partition=min(classes_per_client, present),
                                   class_assignment_mode=assignment, seed=seed)
    return _split(part, labels, num_partitions)


def mirror(labels: np.ndarray, reference_labels: np.ndarray, reference: Partitioning, seed: int) -> Partitioning:
    """Split ``labels`` so each client gets every class in its share of ``reference`` (its train split).

    Used for test sets: a client's own test data then has its training label distribution
    (drawing a fresh Dirichlet split of the test set would give it an unrelated one). Items of
    class c go to clients in proportion to their training items of class c (largest remainder);
    a class no client trains on is spread evenly.
    """
    rng = np.random.default_rng(seed)
    out: list[list[np.ndarray]] = [[] for _ in reference]
    for c in np.unique(labels):
        items = rng.permutation(np.nonzero(labels == c)[0])
        weights = np.array([(reference_labels[idx] == c).sum() for idx in reference], dtype=np.float64)
        weights = weights if weights.sum() > 0 else np.ones(len(reference))
        exact = weights / weights.sum() * len(items)
        counts = np.floor(exact).astype(int)
        counts[np.argsort(-(exact - counts), kind="stable")[: len(items) - counts.sum()]] += 1
        for k, part in enumerate(np.split(items, np.cumsum(counts)[:-1])):
            out[k].append(part)
    return [np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64) for parts in out]


def label_skew(labels: np.ndarray, parts: Partitioning) -> float:
    """Mean total-variation distance between each client's label distribution and the global one.

    0 for perfectly IID parts; near 1 - 1/C when every client holds a single class.
    """
    classes = np.unique(labels)
    overall = np.array([(labels == c).mean() for c in classes])
    distances = []
    for idx in parts:
        if len(idx):
            own = np.array([(labels[idx] == c).mean() for c in classes])
            distances.append(0.5 * np.abs(own - overall).sum())
    return float(np.mean(distances)) if distances else 0.0
