"""Files from elsewhere load safely: weights-only reads, one-line refusals, and clsim's own
checkpoints (numpy state included) written so that a weights-only read gets them back exactly."""

from __future__ import annotations

import copy
import json
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from clsim.cli import main
from clsim.engine.checkpoint import (RunState, load_checkpoint, load_file, load_plain, save_checkpoint, save_plain,
                                     to_plain)
from clsim.errors import ConfigError
from clsim.federated.state import ClientStore, FedState, load_server, save_server
from clsim.registry import MODELS, SERVER_STRATEGIES

TINY = {
    "name": "safe", "seed": 2,
    "data": {"name": "digits"},
    "scenario": {"name": "class_incremental", "n_tasks": 2, "max_train_per_class": 10, "max_test_per_class": 5},
    "model": {"name": "mlp", "hidden": [8]},
    "strategy": {"name": "ewc", "lambda": 10.0},
    "train": {"epochs": 1, "batch_size": 16},
}


def cli(tmp_path: Path, raw: dict, out: Path, *extra: str, capsys) -> tuple[int, list[str]]:
    """``clsim run`` of ``raw`` into ``out``: exit code and the stderr lines."""
    config = tmp_path / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    code = main(["run", str(config), "--out", str(out), "--quiet", *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def convert_with_the_hint(message: str) -> None:
    """Run the ``python -c "..."`` conversion the error message offers (as its user would)."""
    found = re.search(r'python -c "([^"]*)"', message)
    assert found, message
    exec(found.group(1), {})  # noqa: S102 - the test's own file, written just above


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and mtime: what "left as it was" compares."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_mlp(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS.get("mlp")((1, 4, 4), hidden=[4])
    model.grow(classes)
    return model


# --------------------------------------------------------------------------- clsim's own files


def test_numpy_state_round_trips_exactly_through_a_weights_only_file(tmp_path):
    state = {
        "f32": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3) / 3,  # not exactly representable in decimal
        "i64": np.arange(4, dtype=np.int64) - 2**40,
        "mask": np.array([True, False]),
        "zero_d": np.array(1.5),
        "scalars": [np.float64(np.pi), np.int32(-7)],
        "names": np.array(["a", "bc"]),
        "sliced": np.arange(10.0)[::3],  # not contiguous
        "nested": ({"t": torch.arange(3)}, None, "x", 2, 0.5),
    }
    path = tmp_path / "s.pt"
    save_plain(path, state)
    torch.load(path, weights_only=True)  # no pickle, no allow-list: plain containers only
    back = load_plain(path, key="k")
    for key in ("f32", "i64", "mask", "zero_d", "names", "sliced"):
        assert type(back[key]) is np.ndarray and back[key].dtype == state[key].dtype, key
        assert back[key].shape == state[key].shape and np.array_equal(back[key], state[key]), key
    assert back["f32"].tobytes() == state["f32"].tobytes()  # bit for bit
    assert type(back["scalars"][0]) is np.float64 and back["scalars"][0] == np.pi
    assert type(back["scalars"][1]) is np.int32 and back["scalars"][1] == -7
    assert torch.equal(back["nested"][0]["t"], torch.arange(3)) and back["nested"][1:] == (None, "x", 2, 0.5)


def test_a_module_state_dict_keeps_its_type_and_metadata():
    state = torch.nn.BatchNorm1d(2).state_dict()
    plain = to_plain(state)
    assert type(plain) is OrderedDict and plain._metadata == state._metadata


def test_an_object_a_weights_only_read_would_refuse_fails_when_saved_not_on_resume(tmp_path):
    with pytest.raises(TypeError, match=r"'\.strategy\.extra\[1\]'"):
        save_plain(tmp_path / "x.pt", {"strategy": {"extra": [1, object()]}})
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp file


def test_run_checkpoint_is_weights_only_and_restores_run_state(tmp_path):
    model, path = tiny_mlp(), tmp_path / "checkpoints" / "last.pt"
    state = RunState(next_experience=1, rows=[[0.5, None]], final_correct=[1], final_total=[2], elapsed_s=1.25,
                     losses=[0.75], variant_rows={"cls": [[0.5]]}, variant_correct={"cls": [1]}, train_steps=9)
    save_checkpoint(path, state=state, model=model, strategy_state={"fisher": np.full(3, 0.1, np.float32)})
    raw = torch.load(path, weights_only=True)
    assert raw["run"]["next_experience"] == 1
    payload = load_checkpoint(path, torch.device("cpu"))
    assert payload["run"] == state and payload["num_classes"] == 3
    assert payload["strategy"]["fisher"].dtype == np.float32 and payload["strategy"]["fisher"].tolist() == \
        np.full(3, 0.1, np.float32).tolist()
    assert all(torch.equal(payload["model"][k], v) for k, v in model.state_dict().items())


def test_fedavgm_numpy_momentum_survives_the_server_checkpoint(tmp_path):
    pytest.importorskip("flwr")
    rng = np.random.default_rng(0)
    momentum = {"w": rng.standard_normal((2, 3)).astype(np.float32), "b": np.ones(2, np.float32)}
    strategy = SERVER_STRATEGIES.get("fedavgm")(momentum=0.9)
    strategy.load_state_dict({"momentum": momentum})  # Flower keeps it as numpy arrays
    fed = FedState(experience=1, round=2, rows=[[0.25]], elapsed_s=3.0)
    save_server(tmp_path / "last.pt", fed, tiny_mlp(), strategy=strategy.state_dict())
    torch.load(tmp_path / "last.pt", weights_only=True)
    payload = load_server(tmp_path / "last.pt")
    assert payload["federated"] == fed
    fresh = SERVER_STRATEGIES.get("fedavgm")(momentum=0.9)
    fresh.load_state_dict(payload["server_strategy"])
    got = fresh.state_dict()["momentum"]
    assert list(got) == ["w", "b"]
    for key, want in momentum.items():
        assert type(got[key]) is np.ndarray and got[key].dtype == np.float32 and got[key].tobytes() == want.tobytes()


def test_client_state_round_trips_and_a_corrupt_one_is_one_line(tmp_path):
    store = ClientStore(tmp_path, 3)
    store.save(4, {"strategy": {"anchor": np.arange(3.0)}})
    assert store.load(before=5)["strategy"]["anchor"].tolist() == [0.0, 1.0, 2.0]
    file = store.dir / "s0000004.pt"
    file.write_bytes(file.read_bytes()[:40])
    with pytest.raises(ConfigError) as info:
        store.load(before=5)
    assert str(file) in str(info.value) and "truncated or corrupt" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content, expected", [
    (b"", "truncated or corrupt"),
    (b"not a torch file", "truncated or corrupt"),
    (None, "not found"),
])
def test_unreadable_files_are_one_line_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "w.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_file(path, key="teacher.checkpoint")
    assert info.value.path == "teacher.checkpoint" and str(path) in info.value.message
    assert expected in info.value.message and "\n" not in str(info.value)


def test_a_corrupt_safetensors_file_is_one_line(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ConfigError, match="w.safetensors cannot be read"):
        load_file(path, key="model.pretrained")


# --------------------------------------------------------------------------- teacher and pretrained files


def lt_config(weights: Path) -> dict:
    return {
        "name": "lt", "seed": 0,
        "data": {"name": "synthetic", "num_classes": 4, "samples_per_class": 20, "image_size": 8},
        "scenario": {"name": "long_tailed", "imbalance_ratio": 4},
        "model": {"name": "deit", "embed_dim": 16, "depth": 1, "num_heads": 2},
        "strategy": {"name": "deit_lt"},
        "train": {"epochs": 1, "batch_size": 16},
        "teacher": {"model": {"name": "resnet_cifar", "depth": 8, "width": 4}, "checkpoint": str(weights)},
    }


def test_a_teacher_file_that_needs_pickle_is_refused_with_a_conversion_that_works(tmp_path, capsys):
    from clsim.teacher import read_weights

    teacher = MODELS.get("resnet_cifar")((3, 8, 8), depth=8, width=4)
    teacher.grow(4)
    weights = tmp_path / "teacher.pt"
    torch.save(teacher, weights)  # a whole pickled module: loading it runs whatever it names
    code, err = cli(tmp_path, lt_config(weights), tmp_path / "run", capsys=capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("clsim: error: teacher.checkpoint: ") and str(weights) in err[0]
    assert "needs pickle" in err[0] and "weights_only=False" in err[0]
    assert not (tmp_path / "run").exists()  # refused before the run wrote anything
    convert_with_the_hint(err[0])
    converted = read_weights(tmp_path / "teacher.weights.pt", torch.device("cpu"))
    assert converted.keys() == teacher.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in teacher.state_dict().items())


def test_a_pretrained_file_that_needs_pickle_is_refused_with_a_conversion_that_works(tmp_path, capsys, no_network):
    import timm

    from clsim.models.timm_models import vit

    tiny = {"embed_dim": 16, "depth": 1, "num_heads": 2}
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=8, patch_size=2, in_chans=1, **tiny)
    path = tmp_path / "vit.pth"
    torch.save({"model": ref.state_dict(), "epoch": 3, "optimizer_args": np.array([0.1])}, path)  # numpy: pickle
    raw = copy.deepcopy(TINY) | {"model": {"name": "vit", **tiny, "pretrained": str(path)}}
    code, err = cli(tmp_path, raw, tmp_path / "run", capsys=capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("clsim: error: model.pretrained: ") and str(path) in err[0] and "needs pickle" in err[0]
    convert_with_the_hint(err[0])
    loaded = vit((1, 8, 8), **tiny, pretrained=str(tmp_path / "vit.weights.pt")).backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ref.state_dict().items())


def test_a_truncated_teacher_snapshot_is_one_line_naming_it(tmp_path):
    from clsim.teacher import Teacher, save_snapshot, snapshot_path

    class Stream:
        num_classes = 3

        def seen_classes(self, index):
            return 3

    save_snapshot(tmp_path, 0, tiny_mlp())
    teacher = Teacher(lambda: MODELS.get("mlp")((1, 4, 4), hidden=[4]), Stream(), torch.device("cpu"),
                      run_dir=tmp_path)
    assert teacher.for_experience(0) is not None
    file = snapshot_path(tmp_path, 0)
    file.write_bytes(file.read_bytes()[:-30])
    with pytest.raises(ConfigError) as info:
        teacher.for_experience(0)
    assert info.value.path == "teacher.checkpoint" and str(file) in info.value.message


# --------------------------------------------------------------------------- --resume


@pytest.fixture
def finished_run(tmp_path, capsys) -> Path:
    out = tmp_path / "run"
    code, err = cli(tmp_path, TINY, out, capsys=capsys)
    assert code == 0, err
    return out


def test_a_truncated_checkpoint_on_resume_is_one_line_and_leaves_the_run_folder_as_it_was(
        tmp_path, finished_run, capsys):
    last = finished_run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = folder_state(finished_run)
    code, err = cli(tmp_path, TINY, finished_run, "--resume", capsys=capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("clsim: error: --resume: ") and str(last) in err[0] and "truncated or corrupt" in err[0]
    assert folder_state(finished_run) == before  # same files, same bytes, same mtimes


def test_a_checkpoint_that_needs_pickle_is_refused_and_the_hint_makes_it_resumable(tmp_path, finished_run, capsys):
    last = finished_run / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    torch.save(payload | {"legacy": np.zeros(2)}, last)  # as a clsim that saved numpy arrays raw did
    before = folder_state(finished_run)
    code, err = cli(tmp_path, TINY, finished_run, "--resume", capsys=capsys)
    assert code == 2 and len(err) == 1 and str(last) in err[0] and "needs pickle" in err[0], err
    assert folder_state(finished_run) == before
    convert_with_the_hint(err[0])
    expected = json.loads((finished_run / "metrics.json").read_text())["accuracy_matrix"]
    code, err = cli(tmp_path, TINY, finished_run, "--resume", capsys=capsys)
    assert code == 0, err
    assert json.loads((finished_run / "metrics.json").read_text())["accuracy_matrix"] == expected


def test_a_truncated_federated_checkpoint_on_resume_is_one_line_and_changes_nothing(tmp_path, capsys):
    pytest.importorskip("flwr")
    raw = copy.deepcopy(TINY) | {"federated": {"num_clients": 2, "rounds_per_experience": 1,
                                               "backend": "inprocess"}}
    out = tmp_path / "fed"
    code, err = cli(tmp_path, raw, out, capsys=capsys)
    assert code == 0, err
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    before = folder_state(out)
    code, err = cli(tmp_path, raw, out, "--resume", capsys=capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("clsim: error: --resume: ") and str(last) in err[0]
    assert folder_state(out) == before
