"""One Learner for every run: a federated run reports every metric a local run does."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("flwr")

from test_federated import TINY, run  # noqa: E402


def long_tailed(federated: bool) -> dict:
    raw = copy.deepcopy(TINY)
    raw["scenario"] = {"name": "long_tailed", "imbalance_ratio": 10.0, "max_test_per_class": 10}
    raw["strategy"] = {"name": "finetune"}
    raw["metrics"] = {"class_index_cuts": [3, 7]}
    raw["federated"].update(num_clients=1, rounds_per_experience=1)
    raw["train"]["epochs"] = 2
    return raw if federated else {k: v for k, v in raw.items() if k != "federated"}


def test_a_one_client_federation_reports_every_local_metric_with_the_same_values(tmp_path, single_thread):
    """The federated summary used to drop ``metrics.class_index_cuts`` (and prediction variants):
    a long-tailed federated run grouped head/medium/tail by counts whatever the config said."""
    local = run(tmp_path, long_tailed(False), "local")
    federated = run(tmp_path, long_tailed(True), "fed")
    for key in ("accuracy_matrix", "head_accuracy", "medium_accuracy", "tail_accuracy", "train_loss",
                "average_accuracy", "forgetting", "class_order"):
        assert federated[key] == local[key], key
    assert local["head_accuracy"] is not None
    assert set(local) - set(federated) <= {"train_loss_steps"}  # every local key is in the federated run
    assert federated["versions"]["torch"] == local["versions"]["torch"]
