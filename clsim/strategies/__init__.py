"""Built-in continual-learning strategies, each one file, each registered by name."""

from clsim.strategies import deit_lt, drw, ewc, feature_distill, joint, l2, logit_adjust, lwf  # noqa: F401  (registration)
from clsim.strategies import gcab  # noqa: F401  (registration)
from clsim.strategies import avalanche  # noqa: F401  (registration; avalanche-lib is imported only when used)
from clsim.strategies import prompting  # noqa: F401  (registration)
from clsim.strategies.base import Finetune, Strategy

__all__ = ["Finetune", "Strategy"]
