"""Joint training on all data seen so far: the upper bound of a continual learner."""

from __future__ import annotations

from torch import nn
from torch.utils.data import Dataset

from clsim.data.base import ConcatView
from clsim.registry import STRATEGIES
from clsim.strategies.base import Strategy, Task


@STRATEGIES.register("joint")
class Joint(Strategy):
    """Upper bound: at each experience, train on the union of all training data seen so far."""

    def before_task(self, model: nn.Module, task: Task) -> Dataset:
        super().before_task(model, task)
        return ConcatView([e.train for e in (*task.past, task.experience)])
