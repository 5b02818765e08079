"""Built-in continual-learning strategies, each one file, each registered by name."""

from clsim.strategies import ewc, feature_distill, joint, l2, lwf  # noqa: F401  (registration)
from clsim.strategies.base import Finetune, Strategy

__all__ = ["Finetune", "Strategy"]
