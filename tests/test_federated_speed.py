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
