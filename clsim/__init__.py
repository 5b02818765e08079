"""clsim: simulate continual and federated learning of vision models from one YAML file.

The registries fill themselves on first lookup, so ``import clsim`` stays light; ``Strategy``
(which needs torch) is imported when first asked for.
"""

from typing import Any

from clsim.config import ExperimentConfig, load_config, parse_config, smoke
from clsim.registry import DATASETS, MODELS, SCENARIOS, STRATEGIES, Registry

__version__ = "0.1.0"

__all__ = [
    "DATASETS", "MODELS", "SCENARIOS", "STRATEGIES", "ExperimentConfig", "Registry", "Strategy",
    "load_config", "parse_config", "smoke",
]


def __getattr__(name: str) -> Any:
    if name == "Strategy":
        from clsim.strategies.base import Strategy

        return Strategy
    raise AttributeError(f"module 'clsim' has no attribute {name!r}")
