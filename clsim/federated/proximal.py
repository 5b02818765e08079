"""FedProx's client side as an extra loss term (Li et al. 2020, eq. 2), for any CL strategy.

The local objective becomes h(w) = F(w) + mu/2 ||w - w_global||^2, where F is whatever the
client's strategy trains (cross-entropy plus its own penalty or distillation term). The term
is added by the engine at every step (:meth:`clsim.engine.engine.Engine.fit`'s ``terms``), so
the strategy and all its hooks are untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from clsim.engine.engine import LossTerm


def proximal_term(model: nn.Module, *, mu: float) -> LossTerm:
    """mu/2 * sum_i (w_i - w_global_i)^2 over the trainable parameters, with ``w_global`` the
    weights ``model`` holds now (right after the global model was loaded into it)."""
    anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def term(current: nn.Module) -> torch.Tensor:
        total = sum(((p - anchor[n]) ** 2).sum() for n, p in current.named_parameters() if n in anchor)
        return 0.5 * mu * total

    return term
