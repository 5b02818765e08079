"""The experiment config's schema: typed, frozen dataclasses, one per fixed section (a leaf module).

A pluggable section (``data``, ``scenario``, ``model``, ``strategy``, ...) is a :class:`Section`:
a registered factory and its keyword arguments. Everything here depends only on
:mod:`clsim.errors`, so any layer (the engine, tracking, federated fleets) can take these types
without the parsing and the checks (:mod:`clsim.config.parse`, :mod:`clsim.config.checks`).
"""

from __future__ import annotations

import dataclasses
import keyword
from dataclasses import dataclass, field
from typing import Any, Literal

from clsim.errors import ConfigError


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
    trainable: list[str] | None = None
    """Globs over parameter names (``fnmatch``): only the parameters they match train, the rest
    is frozen. Null: every parameter trains. The rehearsal-free recipe of Smith et al. (2023)
    fine-tunes only a pretrained ViT's attention QKV projections and the head:
    ``['*.attn.qkv.*', 'head.*']``. A glob that matches no parameter is an error."""
    frozen: list[str] = field(default_factory=list)
    """Globs of parameters that never train, applied after ``trainable`` (e.g. ``['*.norm*']``)."""
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Learning-rate multipliers by glob, ``{glob: factor}``: a parameter takes the factor of the
    first glob (in the order given) that matches it, 1 otherwise (e.g. ``{'head.*': 10}``)."""

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
        _require("train.trainable", self.trainable is None or len(self.trainable) > 0,
                 "null (all train) or a non-empty list of globs", self.trainable)
        for glob, factor in self.lr_scale.items():
            ok = isinstance(factor, (int, float)) and not isinstance(factor, bool) and 0 <= factor < float("inf")
            _require(f"train.lr_scale.{glob}", ok, "a finite number >= 0", factor)


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


def _require(path: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(path, f"expected {expected}, got {value!r}")


def _yaml_key(param: str) -> str:
    return param[:-1] if param.endswith("_") and keyword.iskeyword(param[:-1]) else param
