"""Shared machinery of the distillation strategies (LwF, feature distillation): a frozen teacher."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from clsim.errors import ConfigError
from clsim.strategies.base import Batches, Strategy, Task


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with gradients off."""
    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


class SelfDistillation(Strategy):
    """Keeps the model as it was at the end of the previous task as a frozen teacher."""

    def __init__(self, *, lambda_: float):
        if lambda_ < 0:
            raise ConfigError("strategy.lambda", f"expected a number >= 0, got {lambda_}")
        self.lambda_ = lambda_
        self.teacher: nn.Module | None = None
        self._model: nn.Module | None = None

    def setup(self, model: nn.Module) -> None:
        self._model = model

    def after_task(self, model: nn.Module, task: Task, batches: Batches) -> None:
        self.teacher = frozen_copy(model)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": None if self.teacher is None else self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["teacher"] is not None:
            # the checkpointed model has the teacher's architecture (same head size)
            self.teacher = frozen_copy(self._model)
            self.teacher.load_state_dict(state["teacher"])
