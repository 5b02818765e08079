"""Learning without Forgetting: distillation of the previous model's predictions."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clsim.errors import ConfigError
from clsim.registry import STRATEGIES
from clsim.strategies.distillation import SelfDistillation


@STRATEGIES.register("lwf")
class LwF(SelfDistillation):
    """Learning without Forgetting (Li & Hoiem, TPAMI 2017): distil old-class predictions.

    Loss = CE + lambda * T^2 * KL(softmax(z_old / T) || softmax(z[:, :C_old] / T)), where
    z_old are the frozen previous model's logits over the C_old classes it knew (Hinton et
    al.'s T^2 keeps the gradient scale independent of the temperature).

    Args:
        lambda: weight of the distillation term.
        temperature: softmax temperature T.
    """

    def __init__(self, *, lambda_: float = 1.0, temperature: float = 2.0):
        super().__init__(lambda_=lambda_)
        if temperature <= 0:
            raise ConfigError("strategy.temperature", f"expected a number > 0, got {temperature}")
        self.temperature = temperature

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Any = None) -> torch.Tensor:
        output = model(x)  # (B, C)
        ce = F.cross_entropy(output, y)
        if self.teacher is None or self.lambda_ == 0:
            return ce
        with torch.no_grad():
            old = self.teacher(x)  # (B, C_old)
        t = self.temperature
        kd = F.kl_div(
            F.log_softmax(output[:, : old.shape[1]] / t, dim=1),
            F.softmax(old / t, dim=1),
            reduction="batchmean",
        )
        return ce + self.lambda_ * t * t * kd
