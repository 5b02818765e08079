"""What makes a federated run cost what its compute costs (issue 15): prompt reply pulls, client
state kept in memory, the server's stream shared with in-process clients, the engine choice."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from clsim.engine.checkpoint import load_plain  # noqa: E402
from clsim.federated.config import FederatedConfig  # noqa: E402
from clsim.federated.fleet import Fleet, Tier  # noqa: E402
from clsim.federated.grid import PromptGrid  # noqa: E402
from clsim.federated.runtime import runtime, shared  # noqa: E402
from clsim.federated.state import STATE_KEY, ClientStore  # noqa: E402
from test_federated import ROOT, run, tiny  # noqa: E402


class SlowGrid:
    """A grid whose replies (to message ids "0".."n-1") become available at given times."""

    def __init__(self, ready_at: list[float]):
        self.t0, self.ready_at, self.pulls = time.monotonic(), ready_at, 0

    def push_messages(self, messages):
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.t0
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                for i in sorted(ids) if self.ready_at[int(i)] <= now]

    def get_node_ids(self):
        return [1, 2]


def test_prompt_grid_returns_soon_after_the_last_reply_and_forwards_the_rest():
    grid = SlowGrid([0.0, 0.03, 0.06])
    started = time.monotonic()
    replies = PromptGrid(grid).send_and_receive(["a", "b", "c"])
    took = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1", "2"]
    assert 0.06 <= took < 0.1  # Flower's own loop pulls every 0.1 s: it would end at 0.1 s or later
    assert PromptGrid(grid).get_node_ids() == [1, 2]


def test_prompt_grid_gives_up_at_the_timeout_with_the_replies_it_has():
    grid = SlowGrid([0.0, 10.0])
    started = time.monotonic()
    replies = PromptGrid(grid).send_and_receive(["a", "b"], timeout=0.1)
    assert [r.metadata.reply_to_message_id for r in replies] == ["0"]
    assert 0.1 <= time.monotonic() - started < 0.2
    assert grid.pulls < 20  # backs off while nothing arrives: ~20 pulls a second at most


def state_of(step: int) -> dict:
    return {"num_classes": 4, "experience": step, "strategy": {
        "anchors": [torch.full((3,), float(step))], "fisher": np.arange(3.0) * step, "count": np.int64(step)}}


def test_client_state_from_memory_equals_the_file_and_is_a_private_copy(tmp_path):
    store = ClientStore(tmp_path, 3)
    store.save(5, state_of(5))
    first = store.load(before=6)
    on_disk = load_plain(tmp_path / "00003" / "s0000005.pt", key=STATE_KEY)
    assert torch.equal(first["strategy"]["anchors"][0], on_disk["strategy"]["anchors"][0])
    assert np.array_equal(first["strategy"]["fisher"], on_disk["strategy"]["fisher"])
    assert first["strategy"]["count"] == on_disk["strategy"]["count"] == 5
    first["strategy"]["anchors"][0].add_(100.0)  # a strategy changing what it loaded, in place
    first["strategy"]["fisher"] += 100.0
    again = store.load(before=6)
    assert again["strategy"]["anchors"][0].tolist() == [5.0] * 3
    assert again["strategy"]["fisher"].tolist() == [0.0, 5.0, 10.0]
    assert store.load(before=5) is None


def test_client_state_rewritten_by_another_process_is_read_from_the_file(tmp_path):
    store = ClientStore(tmp_path, 0)
    store.save(2, state_of(2))
    path = tmp_path / "00000" / "s0000002.pt"
    torch.save({"num_classes": 4, "experience": 2, "strategy": {"other": torch.ones(1)}}, path)
    os.utime(path, ns=(1, 1))  # even at a modification time the kept copy cannot have
    assert list(store.load(before=3)["strategy"]) == ["other"]


def test_client_state_files_are_atomic_and_older_ones_pruned(tmp_path):
    store = ClientStore(tmp_path, 1)
    for step in (1, 2, 3):
        store.save(step, state_of(step))
    names = sorted(p.name for p in (tmp_path / "00001").iterdir())
    assert names == ["s0000002.pt", "s0000003.pt"]  # no temp files left, the oldest pruned
    assert oct((tmp_path / "00001" / "s0000003.pt").stat().st_mode & 0o777) != oct(0o600)
    assert store.load(before=3)["experience"] == 2


def test_in_process_clients_share_the_servers_stream():
    server_rt = object()
    with shared("experiment text", server_rt):
        assert runtime("experiment text") is server_rt
    with pytest.raises(Exception):  # gone after the run: the text is no config
        runtime("experiment text")


@pytest.mark.parametrize("fed, engine", [
    (FederatedConfig(), "inprocess"),
    (FederatedConfig(round_timeout_s=5.0), "simulation"),  # real time-outs need Ray's workers
    (FederatedConfig(fleet=Fleet("hangs", (Tier("h", 1.0, hang_prob=0.1, hang_s=1.0),))), "simulation"),
    (FederatedConfig(backend="simulation"), "simulation"),
    (FederatedConfig(backend="inprocess", round_timeout_s=5.0), "inprocess"),
])
def test_auto_backend_picks_in_process_unless_the_run_needs_real_time_outs(fed, engine):
    assert fed.engine == engine


# ---------------------------------------------------------------- clients reuse their Learner

REUSED = {
    "ewc": {"name": "ewc", "lambda": 10.0},
    "lwf": {"name": "lwf", "lambda": 1.0},
    "l2": {"name": "l2", "lambda": 1.0},
    "si_plugin": {"plugin": str(ROOT / "strategies" / "si.py") + ":SI", "lambda": 1.0},
    "avalanche_si": {"name": "avalanche", "plugin": "SynapticIntelligencePlugin", "si_lambda": 100.0,
                     "train_mb_size": 16},
}


def _reuse_run(tmp_path, monkeypatch, raw: dict, name: str, reuse: bool) -> tuple[dict, int]:
    """A run with clients reusing their Learner (or always rebuilding it) and how many rebuilt."""
    from clsim.federated import client

    rebuilt = []
    rebuild = client._rebuild
    monkeypatch.setattr(client, "_rebuild", lambda job: rebuilt.append(job.client) or rebuild(job))
    if not reuse:
        monkeypatch.setattr(ClientStore, "take", lambda self, *, before: None)
    metrics = run(tmp_path, raw, name)
    monkeypatch.undo()
    return untimed(metrics), len(rebuilt)


def untimed(obj):
    """Metrics without any wall-clock seconds (``*_s`` keys: run, round and server times)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if not k.endswith("_s")}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


@pytest.mark.parametrize("strategy", sorted(REUSED))
def test_a_reused_client_learner_computes_what_a_rebuilt_one_does(tmp_path, monkeypatch, strategy):
    """In one process a client keeps the Learner that saved its state instead of rebuilding it
    from the config and the file; every number must be the rebuild's (3 clients, 2 rounds x 2
    experiences: consolidations and head growth in between)."""
    if strategy == "avalanche_si":
        pytest.importorskip("avalanche")
    raw = tiny(partition={"name": "dirichlet", "alpha": 0.5})
    raw["strategy"] = REUSED[strategy]
    reused, rebuilt_reusing = _reuse_run(tmp_path, monkeypatch, raw, "reused", reuse=True)
    rebuilt, rebuilt_always = _reuse_run(tmp_path, monkeypatch, raw, "rebuilt", reuse=False)
    assert reused == rebuilt
    assert rebuilt_reusing == 3 < rebuilt_always  # only each client's first round builds one


def test_a_reused_heterofl_client_computes_what_a_rebuilt_one_does_and_keeps_no_mask(tmp_path, monkeypatch):
    """HeteroFL's clients train width-scaled sub-models and mask the logits of classes they hold
    no data for, per round: a kept Learner must be the client's own width and start each round
    with no mask left from the last one."""
    from clsim.federated import client
    from clsim.federated.submodels import LabelMask

    raw = tiny(partition={"name": "dirichlet", "alpha": 0.3}, server={"name": "heterofl"},
               fleet="clients/edge_fleet.yaml")
    raw["model"] = {"name": "cnn", "channels": [4, 6], "hidden": 8}
    raw["strategy"] = {"name": "ewc", "lambda": 10.0}
    raw["federated"]["fleet"] = str(ROOT / "clients" / "edge_fleet.yaml")
    masks_before = []
    mask = client.mask_absent

    def counting(model, labels):
        masks_before.append(sum(isinstance(h, LabelMask) for h in model.head._forward_hooks.values()))
        return mask(model, labels)

    with monkeypatch.context() as patch:
        patch.setattr(client, "mask_absent", counting)
        reused, rebuilt_reusing = _reuse_run(tmp_path, monkeypatch, raw, "reused", reuse=True)
    assert len(masks_before) > 6 and set(masks_before) == {0}  # up to 3 clients x 2 rounds x 2 experiences
    rebuilt, rebuilt_always = _reuse_run(tmp_path, monkeypatch, raw, "rebuilt", reuse=False)
    assert reused == rebuilt and rebuilt_reusing < rebuilt_always
