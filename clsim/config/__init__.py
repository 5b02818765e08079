"""Experiment configs: the schema (:mod:`clsim.config.schema`, a leaf), YAML parsing
(:mod:`clsim.config.parse`) and the whole-experiment checks (:mod:`clsim.config.checks`).

Everything public is re-exported here: ``from clsim.config import load_config, TrainConfig``.
"""

from clsim.config.checks import declared_num_classes, load_config, parse_config, parse_teacher, smoke
from clsim.config.parse import (
    apply_override,
    check_kwargs,
    check_value,
    config_parameters,
    load_plugin,
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
)

__all__ = [
    "ExperimentConfig", "MetricsConfig", "ReportConfig", "Section", "TeacherConfig", "TrainConfig",
    "apply_override", "check_kwargs", "check_value", "config_parameters", "declared_num_classes",
    "load_config", "load_plugin", "parse_config", "parse_dataclass", "parse_section", "parse_teacher",
    "read_yaml", "smoke",
]
