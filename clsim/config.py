"""YAML -> typed, validated experiment config.

A pluggable section (``data``, ``scenario``, ``model``, ``strategy``) is a constructor call:
``{name: ewc, lambda: 100}`` is checked against the keyword-only parameters of the factory
registered as ``ewc`` (``lambda`` maps to ``lambda_``, since it is a Python keyword) and later
called as ``EWC(lambda_=100)``. Positional parameters of a factory are what clsim itself
supplies (the source, the seed, the input shape) and never come from YAML.

Fixed sections (``train``, ``metrics``) are dataclasses with a docstring on every field. Every
problem is a :class:`~clsim.errors.ConfigError` naming the key path and what was expected.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import hashlib
import importlib.util
import inspect
import keyword
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from clsim.errors import ConfigError, did_you_mean
from clsim.registry import DATASETS, MODELS, SCENARIOS, STRATEGIES, Registry


@dataclass(frozen=True)
class TrainConfig:
    """How each experience is trained and evaluated."""

    epochs: int = 1
    """Passes over each experience's training data."""
    batch_size: int = 64
    """Training mini-batch size."""
    lr: float = 1e-3
    """Learning rate (constant, or the peak of the cosine schedule)."""
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    """Optimizer, re-created at the start of every experience."""
    momentum: float = 0.9
    """SGD momentum (ignored by Adam/AdamW)."""
    weight_decay: float = 0.0
    """Weight decay."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule within each experience (cosine decays to 0 over its epochs)."""
    eval_batch_size: int = 256
    """Batch size for evaluation."""
    device: str = "cpu"
    """'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available)."""
    amp: bool = False
    """bfloat16 autocast on CUDA (ignored on CPU, where results must be bit-reproducible)."""
    num_workers: int = 0
    """DataLoader worker processes for file-backed data sets (in-memory data needs none)."""
    sam_rho: float = 0.0
    """Sharpness-Aware Minimization radius (Foret et al. 2021): 0 is off; > 0 takes each step
    with the gradient at the weights moved rho along the normalised gradient (two forward and
    backward passes per batch, any optimizer as the base). 0.05 is a common SAM setting."""
    sam_adaptive: bool = False
    """ASAM (Kwon et al. 2021): scale SAM's neighbourhood per weight by |w| (use a larger
    sam_rho, e.g. 0.5-2). Ignored when sam_rho is 0."""

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "eval_batch_size"):
            _require(f"train.{key}", getattr(self, key) >= 1, "an int >= 1", getattr(self, key))
        _require("train.lr", self.lr > 0, "a number > 0", self.lr)
        _require("train.weight_decay", self.weight_decay >= 0, "a number >= 0", self.weight_decay)
        _require("train.momentum", 0 <= self.momentum < 1, "a number in [0, 1)", self.momentum)
        _require("train.num_workers", self.num_workers >= 0, "an int >= 0", self.num_workers)
        _require("train.sam_rho", self.sam_rho >= 0, "a number >= 0 (0 turns SAM off)", self.sam_rho)
        ok = self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:")
        _require("train.device", ok, "'cpu', 'cuda', 'cuda:N' or 'auto'", self.device)


@dataclass(frozen=True)
class MetricsConfig:
    """How results are summarised."""

    many_shot: int = 100
    """A class with more training images than this is 'head' (many-shot)."""
    few_shot: int = 20
    """A class with fewer training images than this is 'tail' (few-shot)."""
    class_index_cuts: list[int] | None = None
    """[h, t]: group by learner label instead of counts: labels < h head, h..t-1 medium, >= t
    tail (DeiT-LT's cuts: [3, 7] for CIFAR-10-LT, [36, 71] for CIFAR-100-LT; in a long_tailed
    scenario label order is count order). Null: by counts (many_shot / few_shot)."""

    def __post_init__(self) -> None:
        ok = 0 <= self.few_shot <= self.many_shot
        _require("metrics.few_shot", ok, "an int in [0, metrics.many_shot]", self.few_shot)
        cuts = self.class_index_cuts
        ok = cuts is None or (len(cuts) == 2 and 0 <= cuts[0] <= cuts[1])
        _require("metrics.class_index_cuts", ok, "null or [h, t] with 0 <= h <= t", cuts)


@dataclass(frozen=True)
class ReportConfig:
    """Optional experiment tracking (:mod:`clsim.tracking`); a plain run needs neither tool.

    Tracking only records what a run does; it never changes its numbers, so a resumed run may
    switch it on or off.
    """

    tensorboard: bool = False
    """Write TensorBoard event files to RUN/tensorboard: training losses (per step, per epoch,
    per experience), per-experience accuracies, the accuracy matrix (image and table) and the
    summary metrics. Needs the ``tensorboard`` package (``pip install 'clsim[tracking]'``)."""
    mlflow: bool = False
    """Log parameters, metrics and the run folder's files to MLflow. Needs ``mlflow`` (or
    ``mlflow-skinny``) installed and a tracking URI: ``mlflow_uri`` or MLFLOW_TRACKING_URI."""
    mlflow_uri: str | None = None
    """MLflow tracking URI (e.g. ``sqlite:///mlflow.db`` or ``http://host:5000``); null: the
    MLFLOW_TRACKING_URI environment variable."""
    mlflow_experiment: str | None = None
    """MLflow experiment name; null: the config's ``name``."""

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.mlflow


@dataclass(frozen=True)
class TeacherConfig:
    """A teacher for distillation strategies (``uses_teacher``), trained first or loaded.

    Trained: a run of its own on the experiment's data and scenario, with ``model``,
    ``strategy`` and ``train`` (``train`` keys override the student's), into ``RUN/teacher``;
    a resumed student reuses it. Loaded: ``checkpoint`` names a teacher run folder (its
    ``config.yaml`` gives the model) or a weights file of ``model`` (``state_dict``, or a clsim
    ``last.pt``) whose outputs follow the run's learner labels.
    """

    model: Section | None
    strategy: Section
    train: TrainConfig
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict() if self.model else None, "strategy": self.strategy.to_dict(),
                "train": dataclasses.asdict(self.train), "checkpoint": self.checkpoint}


@dataclass(frozen=True)
class Section:
    """A pluggable section: a registered factory and the keyword arguments from YAML."""

    key: str
    name: str
    factory: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    plugin: str | None = None

    def build(self, *args: Any) -> Any:
        """Call the factory with clsim's positional ``args`` and the section's kwargs."""
        return self.factory(*args, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        head = {"plugin": self.plugin} if self.plugin else {"name": self.name}
        return head | {_yaml_key(k): v for k, v in self.kwargs.items()}


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: everything ``clsim run`` needs, validated."""

    name: str
    seed: int
    data: Section | None
    """None when the scenario brings its own data (``brings_own_data``, e.g. ``avalanche``)."""
    scenario: Section
    model: Section
    strategy: Section
    train: TrainConfig
    metrics: MetricsConfig
    teacher: TeacherConfig | None = None
    federated: Any = None
    """A :class:`clsim.federated.config.FederatedConfig` when a federation learns the stream."""
    report: ReportConfig = ReportConfig()
    """Experiment tracking (TensorBoard, MLflow); off by default."""

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data; parsing it again gives an equal config."""
        teacher = {"teacher": self.teacher.to_dict()} if self.teacher else {}
        data = {"data": self.data.to_dict()} if self.data is not None else {}
        return {
            "name": self.name,
            "seed": self.seed,
            **data,
            "scenario": self.scenario.to_dict(),
            "model": self.model.to_dict(),
            "strategy": self.strategy.to_dict(),
            "train": dataclasses.asdict(self.train),
            "metrics": dataclasses.asdict(self.metrics),
        } | teacher | ({"federated": self.federated.to_dict()} if self.federated is not None else {}) \
          | ({"report": dataclasses.asdict(self.report)} if self.report != ReportConfig() else {})


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


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; a ConfigError naming the file otherwise.

    The file is decoded as UTF-8 (YAML 1.2's default encoding) whatever the locale, so a config
    reads the same on every machine, and a binary file is a one-line error, not a traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the config file: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not a text file (UTF-8): byte 0x{exc.object[exc.start]:02x} at offset "
                                     f"{exc.start} is not UTF-8; an experiment file is YAML text")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        position = getattr(exc, "position", None)  # a ReaderError (e.g. a NUL byte) has no mark
        where = f" at line {mark.line + 1}" if mark else f" at character {position}" if position is not None else ""
        # str(exc) spans several lines; the CLI prints one.
        problem = " ".join(str(getattr(exc, "problem", None) or getattr(exc, "reason", None) or exc).split())
        raise ConfigError(str(path), f"not valid YAML{where}: {problem}")
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "expected a YAML mapping of sections at the top level")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item}", "expected KEY=VALUE, e.g. train.epochs=3")
    dotted, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(dotted, f"cannot parse override value {text!r}")
    keys = dotted.strip().split(".")
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(keys[: i + 1]), "is not a section, cannot set a key in it")
        node = child
    node[keys[-1]] = value


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
    """A strategy that trains one registered model (``required_model``) gets it: caught here,
    before any data loads or a teacher trains, rather than in ``setup`` mid-run."""
    required = strategy.required_model
    if required is not None and config.model.name != required:
        raise ConfigError("model.name", f"strategy '{config.strategy.name}' trains the '{required}' model, "
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


def parse_section(
    key: str, raw: Any, registry: Registry, base_dir: Path | None = None
) -> Section:
    """A pluggable section: ``{name: NAME, ...kwargs}`` or ``{plugin: FILE.py:Class, ...}``."""
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(key, f"expected a mapping with a 'name', got {_kind(raw)}")
    raw = dict(raw)
    plugin = raw.pop("plugin", None)
    if plugin is not None and "name" in raw and _takes_plugin_kwarg(registry, raw["name"]):
        raw["plugin"], plugin = plugin, None  # the factory's own argument (e.g. avalanche's plugin class)
    if plugin is not None and "name" in raw:
        raise ConfigError(f"{key}.plugin", f"give either 'name' or 'plugin', not both (name: {raw['name']!r}); "
                                           f"to swap in a plugin from the command line, set the whole section: "
                                           f"--set '{key}={{plugin: FILE.py:Class}}'")
    if plugin is not None:
        factory, plugin = load_plugin(plugin, f"{key}.plugin", base_dir), _resolve_plugin(plugin, base_dir)
        name = factory.__name__.lower()
    elif "name" in raw:
        name = check_value(raw.pop("name"), str, f"{key}.name")
        factory = registry.get(name, path=f"{key}.name")
    else:
        raise ConfigError(f"{key}.name", f"missing; one of: {', '.join(registry.names())}")
    kwargs = check_kwargs(key, factory, raw)
    return Section(key=key, name=name, factory=factory, kwargs=kwargs, plugin=plugin)


def _takes_plugin_kwarg(registry: Registry, name: Any) -> bool:
    """Whether the factory registered as ``name`` has a keyword-only ``plugin`` argument of its
    own (then ``plugin:`` next to ``name:`` is that argument, not a plugin file)."""
    if not isinstance(name, str) or name not in registry:
        return False
    return "plugin" in config_parameters(registry.get(name))


def check_kwargs(key: str, factory: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """Check ``raw`` against ``factory``'s keyword-only parameters; return Python kwargs.

    A factory with ``**kwargs`` receives the keys it does not name as they are and checks them
    itself (e.g. the ``avalanche`` strategy forwards them to an Avalanche plugin's constructor).
    """
    params = config_parameters(factory)
    hints = _type_hints(factory)
    known = {_yaml_key(p) for p in params}
    open_ended = _takes_var_kwargs(factory)
    kwargs = {}
    for yaml_key, value in raw.items():
        path = f"{key}.{yaml_key}"
        if yaml_key not in known and open_ended:
            kwargs[yaml_key] = value
            continue
        if yaml_key not in known:
            raise ConfigError(path, f"unknown key{did_you_mean(str(yaml_key), known)}; known: "
                              f"{', '.join(sorted(known)) or 'none'}")
        param = _python_key(yaml_key)
        kwargs[param] = check_value(value, hints.get(param, Any), path)
    missing = [p for p, spec in params.items() if spec.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ConfigError(f"{key}.{_yaml_key(missing[0])}", "required key is missing")
    # Record every default too: config.yaml then reruns the same experiment even if a
    # factory's defaults change later.
    defaults = {p: copy.deepcopy(spec.default) for p, spec in params.items() if p not in kwargs}
    return defaults | kwargs


def config_parameters(factory: Any) -> dict[str, inspect.Parameter]:
    """The keyword-only parameters of ``factory``: the keys its YAML section may hold."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    sig = inspect.signature(target)
    return {n: p for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _takes_var_kwargs(factory: Any) -> bool:
    # signature(cls), not cls.__init__: a class without its own __init__ has object's (*args, **kwargs)
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())


def parse_dataclass(key: str, raw: Any, cls: type) -> Any:
    """A fixed section: ``raw`` checked against the fields of dataclass ``cls``."""
    if not isinstance(raw, dict):
        raise ConfigError(key, f"expected a mapping, got {_kind(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    _reject_unknown(key, raw, fields)
    return cls(**{k: check_value(v, hints[k], f"{key}.{k}") for k, v in raw.items()})


def check_value(value: Any, annotation: Any, path: str) -> Any:
    """``value`` if it fits ``annotation`` (ints widen to floats); a ConfigError otherwise."""
    ok, result = _fit(value, annotation)
    if not ok:
        raise ConfigError(path, f"expected {_describe(annotation)}, got {_kind(value)} {value!r}")
    return result


def _fit(value: Any, ann: Any) -> tuple[bool, Any]:
    if ann is Any or ann is inspect.Parameter.empty:
        return True, value
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, result = _fit(value, arg)
            if ok:
                return True, result
        return False, value
    if origin is Literal:
        return value in args, value
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False, value
        inner = args[0] if args else Any
        fitted = [_fit(v, inner) for v in value]
        return all(ok for ok, _ in fitted), [v for _, v in fitted]
    if origin is dict or ann is dict:
        return isinstance(value, dict), value
    if ann is type(None):
        return value is None, value
    if ann is bool:
        return isinstance(value, bool), value
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if ann is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if ann is str:
        return isinstance(value, str), value
    if inspect.isclass(ann):
        return isinstance(value, ann), value
    return True, value


def _describe(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple) or (origin and "Sequence" in str(origin)):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    names = {int: "an int", float: "a number", bool: "true or false", str: "a string",
             type(None): "null", dict: "a mapping"}
    return names.get(ann, getattr(ann, "__name__", str(ann)))


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an int", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)


def _reject_unknown(prefix: str, raw: dict, known: Any) -> None:
    for key in raw:
        if key not in known:
            path = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(path, f"unknown key{did_you_mean(str(key), known)}; known: {', '.join(known)}")


def _require(path: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(path, f"expected {expected}, got {value!r}")


def _yaml_key(param: str) -> str:
    return param[:-1] if param.endswith("_") and keyword.iskeyword(param[:-1]) else param


def _python_key(key: str) -> str:
    return f"{key}_" if keyword.iskeyword(key) else key


def _type_hints(factory: Any) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references in a plugin: skip type checks
        return {}


def _resolve_plugin(spec: str, base_dir: Path | None) -> str:
    file, _, attr = spec.rpartition(":")
    return f"{_find_plugin_file(file, base_dir) or file}:{attr}"


def _find_plugin_file(file: str, base_dir: Path | None) -> Path | None:
    for root in (Path.cwd(), base_dir, base_dir.parent if base_dir else None):
        if root is not None and (root / file).is_file():
            return (root / file).resolve()
    return None


def load_plugin(spec: Any, path: str, base_dir: Path | None = None) -> Any:
    """Load ``FILE.py:Attr`` (relative to the working directory or the config's folder)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(path, f"expected 'path/to/file.py:ClassName', got {spec!r}")
    file, _, attr = spec.rpartition(":")
    found = _find_plugin_file(file, base_dir)
    if found is None:
        raise ConfigError(path, f"plugin file '{file}' not found (looked in the working "
                                f"directory and next to the config)")
    # stable across processes (unlike hash()), so worker processes name the module alike
    module_name = f"clsim_plugin_{found.stem}_{hashlib.sha1(str(found).encode()).hexdigest()[:12]}"
    module = sys.modules.get(module_name)
    if module is None:
        spec_obj = importlib.util.spec_from_file_location(module_name, found)
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[module_name] = module
        try:
            spec_obj.loader.exec_module(module)
        except (ImportError, SyntaxError) as exc:  # the user's file or its environment: exit 2
            del sys.modules[module_name]
            line = f", line {exc.lineno}" if isinstance(exc, SyntaxError) else ""
            raise ConfigError(path, f"'{file}' failed to import{line}: {type(exc).__name__}: {exc}") from exc
        except BaseException:  # a bug in the plugin: keep its traceback, but not a half-loaded module
            del sys.modules[module_name]
            raise
    if not hasattr(module, attr):
        names = [n for n in vars(module) if not n.startswith("_")]
        raise ConfigError(path, f"'{file}' defines no '{attr}'{did_you_mean(attr, names)}")
    return getattr(module, attr)


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
