"""Config: YAML -> typed config; every bad input is a ConfigError naming its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

import clsim
from clsim.config import TrainConfig, apply_override, load_config, parse_config, smoke
from clsim.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def base() -> dict:
    return {
        "name": "t", "seed": 0,
        "data": {"name": "synthetic", "num_classes": 6, "samples_per_class": 10, "image_size": 8},
        "scenario": {"name": "class_incremental", "n_tasks": 3},
        "model": {"name": "mlp", "hidden": [16]},
        "strategy": {"name": "ewc", "lambda": 10.0},
        "train": {"epochs": 1},
    }


def error_for(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value


def test_sections_become_constructor_kwargs():
    config = parse_config(base())
    assert config.strategy.kwargs["lambda_"] == 10.0  # YAML 'lambda' -> Python 'lambda_'
    # every default is recorded, so config.yaml reruns the same experiment later
    assert config.strategy.kwargs == {"lambda_": 10.0, "mode": "separate", "decay": 1.0,
                                      "params": "all", "mask_past": False, "fisher": "batch",
                                      "l2": 0.0, "first_task_anchor": "pretrained"}
    strategy = config.strategy.build()
    assert type(strategy).__name__ == "EWC" and strategy.lambda_ == 10.0
    assert isinstance(config.train, TrainConfig) and config.train.epochs == 1


def test_resolved_config_round_trips():
    config = parse_config(base())
    assert parse_config(config.to_dict()) == config
    assert config.to_dict()["strategy"]["lambda"] == 10.0


@pytest.mark.parametrize("section, key, suggestion", [
    ("strategy", "lamda", "lambda"),
    ("train", "epoch", "epochs"),
    ("scenario", "n_task", "n_tasks"),
])
def test_unknown_key_names_path_and_suggests(section, key, suggestion):
    raw = base()
    raw[section][key] = 1
    err = error_for(raw)
    assert err.path == f"{section}.{key}"
    assert f"did you mean '{suggestion}'" in str(err)


def test_unknown_top_level_key_and_unknown_name():
    raw = base() | {"strategyy": {}}
    assert "did you mean 'strategy'" in str(error_for(raw))
    raw = base()
    raw["strategy"]["name"] = "ewcc"
    err = error_for(raw)
    assert err.path == "strategy.name" and "did you mean 'ewc'" in str(err)


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "epochs", "three", "an int"),
    ("train", "lr", True, "a number"),
    ("strategy", "lambda", [1], "a number"),
    ("scenario", "class_order", "shuffled", "'random'"),
    ("model", "hidden", [16, "x"], "a list of an int"),
])
def test_wrong_types_are_rejected(section, key, value, expected):
    raw = base()
    raw[section][key] = value
    err = error_for(raw)
    assert err.path == f"{section}.{key}" and expected in str(err)


@pytest.mark.parametrize("section, key, value", [
    ("train", "lr", -0.1),
    ("train", "epochs", 0),
    ("train", "device", "tpu"),
    ("strategy", "lambda", -1.0),
    ("scenario", "n_tasks", 7),  # more tasks than the 6 classes
])
def test_out_of_range_values_are_rejected(section, key, value):
    raw = base()
    raw[section][key] = value
    err = error_for(raw)
    assert err.path == f"{section}.{key}"


def test_imbalance_ratio_below_one_is_rejected_when_built():
    raw = base()
    raw["scenario"] = {"name": "long_tailed", "imbalance_ratio": 0.5}
    config = parse_config(raw)
    with pytest.raises(ConfigError) as info:
        config.scenario.build(config.data.build(), 0)
    assert info.value.path == "scenario.imbalance_ratio"


def test_n_tasks_checked_against_a_fixed_size_dataset_without_loading_it():
    raw = base()
    raw["data"] = {"name": "cifar100"}
    raw["scenario"]["n_tasks"] = 101
    assert error_for(raw).path == "scenario.n_tasks"


def test_missing_section_and_missing_required_key():
    raw = base()
    del raw["model"]
    assert error_for(raw).path == "model"
    raw = base()
    del raw["data"]  # optional only for scenarios that bring their own data (avalanche)
    assert error_for(raw).path == "data" and "missing section" in str(error_for(raw))
    raw = base()
    raw["model"] = {"name": "timm"}  # `arch` has no default
    assert error_for(raw).path == "model.arch"


def test_override_sets_nested_keys_with_yaml_values():
    raw = base()
    apply_override(raw, "train.epochs=3")
    apply_override(raw, "strategy={name: lwf, lambda: 2}")
    config = parse_config(raw)
    assert config.train.epochs == 3 and config.strategy.name == "lwf"
    with pytest.raises(ConfigError) as info:
        apply_override(raw, "train.epochs")
    assert "KEY=VALUE" in str(info.value)


def test_override_is_validated_like_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: digits\nscenario: class_incremental\nmodel: mlp\nstrategy: finetune\n")
    assert load_config(path, ["train.lr=0.5"]).train.lr == 0.5
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.lr=-1"])
    assert info.value.path == "train.lr"
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.lrr=1"])
    assert info.value.path == "train.lrr"


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "not found" in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "not valid YAML at line" in str(info.value)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError):
        load_config(bad)


def test_smoke_shrinks_epochs_and_data():
    config = smoke(parse_config(base() | {"train": {"epochs": 50}}))
    assert config.train.epochs == 1
    assert config.scenario.kwargs["max_train_per_class"] == 16


@pytest.mark.parametrize("where", ["config_dir", "parent", "cwd", "nowhere"])
def test_a_relative_pretrained_file_is_found_next_to_the_config(where, tmp_path, monkeypatch):
    """scenarios/x.yaml naming weights/w.safetensors runs from any working directory."""
    (tmp_path / "repo" / "scenarios").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    home = {"config_dir": "repo/scenarios", "parent": "repo", "cwd": "elsewhere", "nowhere": "void"}[where]
    if where != "nowhere":
        (tmp_path / home / "weights").mkdir(parents=True)
        (tmp_path / home / "weights" / "w.safetensors").write_bytes(b"")
    path = tmp_path / "repo" / "scenarios" / "x.yaml"
    raw = base()
    raw["model"] = {"name": "vit", "pretrained": "weights/w.safetensors"}
    path.write_text(__import__("yaml").safe_dump(raw))
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = load_config(path)
    expected = {"config_dir": str(tmp_path / home / "weights" / "w.safetensors"),
                "parent": str(tmp_path / home / "weights" / "w.safetensors"),
                "cwd": "weights/w.safetensors", "nowhere": "weights/w.safetensors"}[where]
    assert config.model.kwargs["pretrained"] == expected  # nowhere: the factory says it is not found
    assert parse_config(config.to_dict()) == config


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_scenario_validates(path):
    config = load_config(path)
    assert config.name == path.stem
    assert parse_config(config.to_dict()) == config


def test_registries_are_filled():
    assert {"digits", "synthetic", "cifar10", "cifar100", "imagenet_r", "tiny_imagenet",
            "image_folder"} <= set(clsim.DATASETS.names())
    assert {"finetune", "joint", "l2", "ewc", "lwf", "feature_distill"} <= set(clsim.STRATEGIES.names())
    assert {"vit", "resnet", "mlp", "cnn", "timm"} <= set(clsim.MODELS.names())


@pytest.mark.parametrize("name", clsim.STRATEGIES.names())
def test_every_strategy_rejects_an_unknown_key_by_name(name):
    # also those without an __init__ of their own (joint), whose signature is object's (*args, **kwargs)
    raw = base()
    raw["strategy"] = {"name": name, "zz_unknown": 1}
    assert "strategy.zz_unknown" in str(error_for(raw))


def test_synthetic_pretrained_scenario_loads_its_committed_weights_from_anywhere(tmp_path, monkeypatch):
    """The shipped CPU setting of the rehearsal-free benchmark validates and finds its weights file."""
    monkeypatch.chdir(tmp_path)
    config = load_config(ROOT / "scenarios" / "synthetic_pretrained.yaml")
    assert Path(config.model.kwargs["pretrained"]) == ROOT / "weights" / "synthetic_vit16.safetensors"
    assert config.strategy.name == "l2" and config.strategy.kwargs["params"] == "attention"
    assert config.train.trainable == ["*.attn.qkv.*", "head.*"]
    source = config.data.build()
    model = config.model.build(source.input_shape)  # the file fits the model (else a ConfigError)
    assert model.pretrained and model.backbone.pos_embed.shape == (1, 17, 64)
