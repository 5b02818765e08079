"""The whole experiment: YAML -> a validated :class:`~clsim.config.schema.ExperimentConfig`.

:func:`load_config` reads a file and its overrides; :func:`parse_config` checks every section
and the checks that span sections (a strategy's required model, a teacher section exactly when
the strategy distils from one, the federated section against the model and the strategy), so a
wrong config fails at ``clsim validate``, before any data loads.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from pathlib import Path
from typing import Any

from clsim.config.parse import (
    _kind,
    _reject_unknown,
    apply_override,
    check_value,
    config_parameters,
    parse_dataclass,
    parse_section,
    read_yaml,
)
from clsim.config.schema import (
    ExperimentConfig,
    MetricsConfig,
    ReportConfig,
    Section,
    TeacherConfig,
    TrainConfig,
    _require,
)
from clsim.errors import ConfigError
from clsim.registry import DATASETS, MODELS, SCENARIOS, STRATEGIES, Registry


SECTIONS: dict[str, Registry] = {
    "data": DATASETS, "scenario": SCENARIOS, "model": MODELS, "strategy": STRATEGIES,
}


FIXED: dict[str, type] = {"train": TrainConfig, "metrics": MetricsConfig, "report": ReportConfig}


TOP_LEVEL = ("name", "seed", *SECTIONS, *FIXED, "teacher", "federated")


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read ``path``, apply ``--set key=value`` overrides, and validate."""
    raw = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    raw.setdefault("name", Path(path).stem)
    config = parse_config(raw, base_dir=Path(path).resolve().parent)
    if config.report.enabled:
        # Tools installed, MLflow URI given: caught by validate and before a run trains. Here and
        # not in parse_config: federated workers and SuperNodes parse the same config and must
        # not need the tracking tools of the machine that runs the server.
        from clsim.tracking import check_report  # numpy only; imports neither tool

        check_report(config.report)
    return config


def parse_config(raw: dict[str, Any], *, base_dir: Path | None = None) -> ExperimentConfig:
    """Validate a raw mapping into an :class:`ExperimentConfig`."""
    raw = copy.deepcopy(raw)
    _reject_unknown("", raw, TOP_LEVEL)
    for key in ("scenario", "model", "strategy"):
        if key not in raw:
            raise ConfigError(key, "missing section")
    name = check_value(raw.get("name", "experiment"), str, "name")
    seed = check_value(raw.get("seed", 0), int, "seed")
    _require("seed", seed >= 0, "an int >= 0", seed)
    sections = {k: parse_section(k, raw[k], reg, base_dir) for k, reg in SECTIONS.items() if k != "data"}
    sections["data"] = _parse_data(raw, sections["scenario"], base_dir)
    sections["model"] = _resolve_pretrained(sections["model"], base_dir)
    fixed = {k: parse_dataclass(k, raw.get(k) or {}, cls) for k, cls in FIXED.items()}
    teacher = parse_teacher(raw["teacher"], fixed["train"], base_dir) if raw.get("teacher") else None
    config = ExperimentConfig(name=name, seed=seed, **sections, **fixed, teacher=teacher,
                              federated=_parse_federated(raw.get("federated"), base_dir, sections["model"]))
    _check_consistency(config)
    # Strategies are cheap to construct and check their own arguments' ranges (e.g. a
    # negative lambda), so build one now: the error surfaces at validate time, not mid-run.
    strategy = config.strategy.build()
    _check_model(config, strategy)
    _check_teacher(config, strategy)
    _check_federated(config, strategy)
    return config


def _resolve_pretrained(model: Section, base_dir: Path | None) -> Section:
    """A relative ``model.pretrained`` file is looked up as a fleet profile is: in the working
    directory, then next to the config and one folder up (``scenarios/x.yaml`` -> ``weights/``).
    Found away from the working directory, it is kept as an absolute path, so the run folder's
    config.yaml reruns from anywhere."""
    file = model.kwargs.get("pretrained")
    if not isinstance(file, str) or base_dir is None or Path(file).expanduser().is_absolute() \
            or (Path.cwd() / file).is_file():
        return model
    found = next((root / file for root in (base_dir, base_dir.parent) if (root / file).is_file()), None)
    return dataclasses.replace(model, kwargs=model.kwargs | {"pretrained": str(found)}) if found else model


def _parse_federated(raw: Any, base_dir: Path | None, model: Section) -> Any:
    if raw is None:
        return None
    from clsim.federated.config import check_with_model, parse_federated  # a higher layer, imported only when used

    federated = parse_federated(raw, base_dir)
    check_with_model(federated, model)  # e.g. sub-model server strategies need a scalable model
    return federated


def _check_federated(config: ExperimentConfig, strategy: Any) -> None:
    if config.federated is not None:
        from clsim.federated.config import check_with_strategy

        check_with_strategy(config.federated, strategy)  # e.g. FedRolex vs per-parameter CL state


def parse_teacher(raw: Any, train: TrainConfig, base_dir: Path | None) -> TeacherConfig:
    """The ``teacher:`` section; its ``train`` keys override the student's ``train``."""
    if not isinstance(raw, dict):
        raise ConfigError("teacher", f"expected a mapping, got {_kind(raw)}")
    _reject_unknown("teacher", raw, ("model", "strategy", "train", "checkpoint"))
    checkpoint = raw.get("checkpoint")
    if checkpoint is not None:
        checkpoint = check_value(checkpoint, str, "teacher.checkpoint")
        if not Path(checkpoint).expanduser().exists():
            raise ConfigError("teacher.checkpoint", f"no such file or folder: {Path(checkpoint).expanduser().resolve()}")
    is_run = checkpoint is not None and Path(checkpoint).expanduser().is_dir()
    if raw.get("model") is None and not is_run:
        raise ConfigError("teacher.model", "missing: the teacher's architecture (e.g. {name: resnet_cifar, depth: 32}),"
                                           " unless teacher.checkpoint names a teacher run folder")
    if raw.get("model") is not None and is_run:
        raise ConfigError("teacher.model", "give either a model or a run folder as teacher.checkpoint, not both "
                                           "(the run folder's config.yaml names its model)")
    model = parse_section("teacher.model", raw["model"], MODELS, base_dir) if raw.get("model") else None
    strategy = parse_section("teacher.strategy", raw.get("strategy") or "finetune", STRATEGIES, base_dir)
    overrides = raw.get("train") or {}
    if not isinstance(overrides, dict):
        raise ConfigError("teacher.train", f"expected a mapping, got {_kind(overrides)}")
    _reject_unknown("teacher.train", overrides, {f.name for f in dataclasses.fields(TrainConfig)})
    try:
        teacher_train = parse_dataclass("teacher.train", dataclasses.asdict(train) | overrides, TrainConfig)
    except ConfigError as exc:  # TrainConfig's own range checks name "train.KEY"
        raise ConfigError(f"teacher.{exc.path}", exc.message) from None
    return TeacherConfig(model=model, strategy=strategy, train=teacher_train, checkpoint=checkpoint)


def _check_model(config: ExperimentConfig, strategy: Any) -> None:
    """A strategy that trains given registered models (``required_model``) gets one: caught here,
    before any data loads or a teacher trains, rather than in ``setup`` mid-run."""
    required = strategy.required_model
    allowed = (required,) if isinstance(required, str) else tuple(required or ())
    if allowed and config.model.name not in allowed:
        names = " or ".join(f"'{name}'" for name in allowed)
        raise ConfigError("model.name", f"strategy '{config.strategy.name}' trains the {names} model, "
                                        f"got '{config.model.name}'")


def _check_teacher(config: ExperimentConfig, strategy: Any) -> None:
    """A teacher section exactly when the strategy distils from one."""
    uses = strategy.uses_teacher
    if uses and config.teacher is None:
        raise ConfigError("teacher", f"strategy '{config.strategy.name}' distils from a teacher: add a 'teacher:' "
                                     f"section (model and training, or a checkpoint)")
    if config.teacher is not None and not uses:
        raise ConfigError("teacher", f"strategy '{config.strategy.name}' does not use a teacher; remove the section")
    if config.teacher is not None:
        config.teacher.strategy.build()


def _parse_data(raw: dict[str, Any], scenario: Section, base_dir: Path | None) -> Section | None:
    """The ``data`` section; absent (None) exactly when the scenario brings its own data."""
    if getattr(scenario.factory, "brings_own_data", False):
        if "data" in raw:
            raise ConfigError("data", f"scenario '{scenario.name}' brings its own data and reads no "
                                      f"data section: remove it")
        return None
    if "data" not in raw:
        raise ConfigError("data", "missing section")
    return parse_section("data", raw["data"], DATASETS, base_dir)


def _check_consistency(config: ExperimentConfig) -> None:
    """Cross-section checks that need no data: e.g. more tasks than classes."""
    if config.data is None:
        return
    n_classes = declared_num_classes(config.data)
    n_tasks = config.scenario.kwargs.get("n_tasks")
    per_task = config.scenario.kwargs.get("classes_per_task")
    if n_classes is not None and n_tasks is not None and per_task is None and n_tasks > n_classes:
        raise ConfigError("scenario.n_tasks",
                          f"expected at most {n_classes} (the classes in data '{config.data.name}'), got {n_tasks}")


def declared_num_classes(data: Section) -> int | None:
    """Class count of a data section known without loading it, or None."""
    if "num_classes" in data.kwargs:
        return data.kwargs["num_classes"]
    params = config_parameters(data.factory)
    if "num_classes" in params and params["num_classes"].default is not inspect.Parameter.empty:
        return params["num_classes"].default
    return getattr(data.factory, "num_classes", None)


def smoke(config: ExperimentConfig) -> ExperimentConfig:
    """A copy shrunk to a smoke run: one epoch and a few images per class (big_vision's runlocal)."""
    limits = {"max_train_per_class": 16, "max_test_per_class": 8}
    params = config_parameters(config.scenario.factory)
    scenario_kwargs = config.scenario.kwargs | {k: v for k, v in limits.items() if k in params}
    teacher = config.teacher
    if teacher is not None:
        teacher = dataclasses.replace(teacher, train=dataclasses.replace(teacher.train, epochs=1))
    return dataclasses.replace(
        config,
        scenario=dataclasses.replace(config.scenario, kwargs=scenario_kwargs),
        train=dataclasses.replace(config.train, epochs=1),
        teacher=teacher,
        federated=config.federated.smoke() if config.federated is not None else None,
    )
