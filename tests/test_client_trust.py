"""Clients decide what code they run (issue 16, point 3): the node's own ``allow-code`` list for
the plugin files and Avalanche plugins the server's config names; open in simulation, empty on a
deployment node unless its node config says otherwise. And the server's checks of what nodes say
they hold (``partition-id`` / ``num-partitions``).

The federations here go through :class:`~clsim.federated.grid.InProcessGrid` with per-node node
configs and the deployment's discovery (every node asked for its partition), outside
:func:`~clsim.federated.trust.trusting`: the nodes behave as SuperNodes on other machines would.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

pytest.importorskip("flwr")

from clsim.config import parse_config  # noqa: E402
from clsim.federated import trust  # noqa: E402
from clsim.federated.runtime import config_text  # noqa: E402
from test_federated import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SI_FILE = ROOT / "strategies" / "si.py"


@pytest.fixture(autouse=True)
def deployment(monkeypatch):
    """Not a simulation unless a test says so (the suite may run inside one's environment)."""
    monkeypatch.delenv(trust.SIMULATION_ENV, raising=False)


def si_config(**federated) -> dict:
    raw = tiny(num_clients=2, rounds_per_experience=1, **federated)
    raw["strategy"] = {"plugin": f"{SI_FILE}:SI", "lambda": 1.0}
    return raw


def test_every_plugin_a_config_names_is_found_with_its_key():
    raw = {"strategy": {"name": "avalanche", "plugin": "EWCPlugin", "ewc_lambda": 1.0},
           "model": {"plugin": "/opt/p/model.py:Net", "width": 2},
           "data": {"name": "digits"},
           "sweep": [{"scenario": {"plugin": "s.py:S"}}]}
    assert trust.requested_code(raw) == [("strategy.plugin", "avalanche:EWCPlugin"),
                                         ("model.plugin", "/opt/p/model.py:Net"),
                                         ("sweep[0].scenario.plugin", "s.py:S")]
    assert trust.requested_code(tiny()) == []  # registered clsim components only


def test_the_allow_list_patterns(tmp_path, monkeypatch):
    plugin = tmp_path / "p.py"
    plugin.write_text("")
    code = f"{plugin}:Cls"
    assert trust.allow_list({}) == []  # a deployment node: nothing
    assert trust.allow_list({"allow-code": " avalanche:*, /x/*.py ,"}) == ["avalanche:*", "/x/*.py"]
    assert trust.allowed("avalanche:EWCPlugin", ["avalanche:*"])
    assert not trust.allowed("avalanche:EWCPlugin", ["avalanche:LwFPlugin", "EWCPlugin"])
    assert trust.allowed(code, [str(plugin)]) and trust.allowed(code, [f"{tmp_path}/*.py"])
    assert not trust.allowed(code, [str(tmp_path / "q.py")]) and not trust.allowed(code, [])
    # the path it resolves to on this node counts too (a symlinked plugin folder)
    link = tmp_path / "linked"
    link.symlink_to(tmp_path)
    assert trust.allowed(f"{link}/p.py:Cls", [str(plugin)])
    monkeypatch.setenv(trust.SIMULATION_ENV, "1")
    assert trust.allow_list({}) == ["*"] and trust.allowed(code, ["*"])
    assert trust.allow_list({"allow-code": ""}) == []  # a node's own list wins even in simulation
    with trust.trusting() as env:
        assert env == {trust.SIMULATION_ENV: "1"}
    monkeypatch.delenv(trust.SIMULATION_ENV)
    with trust.trusting():
        assert trust.allow_list({}) == ["*"]
    assert trust.allow_list({}) == []  # restored


def test_a_refusal_names_the_code_the_key_and_the_node_config_to_set(caplog):
    text = config_text(parse_config(si_config()))
    with caplog.at_level(logging.ERROR, logger="clsim.client"), pytest.raises(trust.RefusedCode) as refused:
        trust.check(text, {"partition-id": 0})
    message = str(refused.value)
    assert f"'{SI_FILE}:SI'" in message and "(strategy.plugin)" in message and "(empty)" in message
    assert f"allow-code='{SI_FILE}'" in message
    assert message in caplog.text  # in the client's log, not only in the reply
    trust.check(text, {"allow-code": str(SI_FILE)})
    trust.check(config_text(parse_config(tiny())), {})  # nothing to allow


def federate(tmp_path: Path, raw: dict, node_configs: list[dict]) -> dict:
    """The federation with each node's own node config, discovered as on a deployment."""
    from clsim.engine.progress import Progress
    from clsim.federated.client import app
    from clsim.federated.grid import InProcessGrid, task_identity
    from clsim.federated.server import Federation
    from clsim.report.run_folder import write_config

    config, out = parse_config(raw), tmp_path / "run"
    grid = InProcessGrid(app, len(node_configs))
    for context, extra in zip(grid.contexts.values(), node_configs, strict=True):
        context.node_config.update(extra)
    with Progress(quiet=True) as progress, task_identity():
        federation = Federation(config, out, progress)
        write_config(config, out)
        federation.run(grid)
    return json.loads((out / "metrics.json").read_text())


def test_a_node_refuses_a_plugin_it_does_not_allow_and_the_server_records_why(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="clsim.client"):
        metrics = federate(tmp_path, si_config(), [{"allow-code": f"{ROOT}/strategies/*.py"}, {}])
    for record in metrics["rounds"]:
        assert record["aggregated"] == [0]  # the allowing node trained
        assert list(record["failed"]) == ["1"] and "this node does not run" in record["failed"]["1"]
        assert "allow-code" in record["failed"]["1"]
    assert "this node does not run" in caplog.text
    assert metrics["failed_clients"] == len(metrics["rounds"])


def test_simulation_clients_run_the_plugin(tmp_path):
    """``clsim run`` of a federation (in-process here) is open: the same plugin trains everywhere."""
    from clsim.cli import main

    config = tmp_path / "si.yaml"
    config.write_text(yaml.safe_dump(si_config(backend="inprocess")))
    assert main(["run", str(config), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    assert all(sorted(r["aggregated"]) == [0, 1] and not r["failed"] for r in metrics["rounds"])


@pytest.mark.parametrize(("nodes", "says"), [
    ([{"partition-id": 0}, {"partition-id": 0}], "both have partition-id=0"),
    ([{"partition-id": 0}, {"partition-id": 2}], "partition-id=2, outside 0..1"),
    ([{"partition-id": 0, "num-partitions": 3}, {"partition-id": 1, "num-partitions": 3}],
     "num-partitions=3, but federated.num_clients is 2"),
])
def test_what_nodes_say_they_hold_is_checked(tmp_path, nodes, says):
    with pytest.raises(RuntimeError, match=says) as raised:
        federate(tmp_path, tiny(num_clients=2, rounds_per_experience=1), nodes)
    assert "--node-config 'partition-id=K num-partitions=2'" in str(raised.value)
