"""Shared machinery of the quadratic weight penalties (L2, EWC): anchors and importances."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clsim.errors import ConfigError
from clsim.strategies.base import Strategy
from clsim.strategies.params import ParamSpec, overlap, select_parameters

Tensors = dict[str, torch.Tensor]


class AnchoredPenalty(Strategy):
    """Cross-entropy + lambda/2 * sum_k sum_i w_k,i (theta_i - theta*_k,i)^2.

    Each anchor k is a snapshot theta*_k of the selected parameters, with per-parameter
    importance w_k (None = 1, i.e. plain L2). Subclasses decide when anchors are taken and
    what their importances are.
    """

    def __init__(self, *, lambda_: float, params: ParamSpec, mask_past: bool):
        if lambda_ < 0:
            raise ConfigError("strategy.lambda", f"expected a number >= 0, got {lambda_}")
        self.lambda_ = lambda_
        self.params = params
        self.mask_past = mask_past
        self.names: list[str] = []
        self.anchors: list[tuple[Tensors, Tensors | None]] = []

    def setup(self, model: nn.Module) -> None:
        self.names = select_parameters(model, self.params)

    def snapshot(self, model: nn.Module) -> Tensors:
        """Detached copies of the selected parameters."""
        params = dict(model.named_parameters())
        return {n: params[n].detach().clone() for n in self.names}

    def penalty(self, model: nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        total = torch.zeros((), device=next(model.parameters()).device)
        for anchor, importance in self.anchors:
            for name, old in anchor.items():
                diff = (overlap(params[name], old) - old).pow(2)
                total = total + (diff if importance is None else importance[name] * diff).sum()
        return total

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, output: Any) -> torch.Tensor:
        ce = super().loss(model, x, y, output)
        if not self.anchors or self.lambda_ == 0:
            return ce
        return ce + 0.5 * self.lambda_ * self.penalty(model)

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": self.anchors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchors = state["anchors"]
