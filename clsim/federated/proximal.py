"""FedProx's client side as a wrapper around any CL strategy (Li et al. 2020, eq. 2).

The local objective becomes h(w) = F(w) + mu/2 ||w - w_global||^2, where F is whatever the
wrapped strategy trains (cross-entropy plus its own penalty or distillation term). Every other
hook is the wrapped strategy's, so its state (Fisher, teacher, ...) is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from clsim.scenarios.base import Experience
from clsim.strategies.base import Batches, Strategy


class Proximal(Strategy):
    """``inner`` plus the proximal term toward the global weights the round started from.

    Args:
        inner: the client's CL strategy.
        mu: weight of the proximal term.
        model: the model right after the global weights were loaded into it.
    """

    def __init__(self, inner: Strategy, *, mu: float, model: nn.Module):
        self.inner = inner
        self.mu = mu
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def proximal_term(self, model: nn.Module) -> torch.Tensor:
        """mu/2 * sum_i (w_i - w_global_i)^2 over the trainable parameters."""
        total = sum(((p - self.anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in self.anchor)
        return 0.5 * self.mu * total

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, output: Any) -> torch.Tensor:
        loss = self.inner.loss(model, x, y, output)
        return loss + self.proximal_term(model) if self.mu > 0 else loss

    # Everything else is the wrapped strategy's.
    def setup(self, model: nn.Module) -> None:
        self.inner.setup(model)

    def before_task(self, model: nn.Module, experience: Experience) -> None:
        self.inner.before_task(model, experience)

    def train_dataset(self, experience: Experience, past: Sequence[Experience]) -> Dataset:
        return self.inner.train_dataset(experience, past)

    def before_epoch(self, model: nn.Module, epoch: int, epochs: int, steps: int) -> None:
        self.inner.before_epoch(model, epoch, epochs, steps)

    def forward(self, model: nn.Module, x: torch.Tensor) -> Any:
        return self.inner.forward(model, x)

    def after_backward(self, model: nn.Module) -> None:
        self.inner.after_backward(model)

    def after_step(self, model: nn.Module) -> None:
        self.inner.after_step(model)

    def after_task(self, model: nn.Module, experience: Experience, batches: Batches) -> None:
        self.inner.after_task(model, experience, batches)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.inner.predict(model, x)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
