"""clsim: simulate continual and federated learning of vision models from one YAML file."""

from clsim import data, models, scenarios, strategies  # noqa: F401  (fills the registries)
from clsim.config import ExperimentConfig, load_config, parse_config, smoke
from clsim.registry import DATASETS, MODELS, SCENARIOS, STRATEGIES, Registry
from clsim.strategies.base import Strategy

__version__ = "0.1.0"

__all__ = [
    "DATASETS", "MODELS", "SCENARIOS", "STRATEGIES", "ExperimentConfig", "Registry", "Strategy",
    "load_config", "parse_config", "smoke",
]
