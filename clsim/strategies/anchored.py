"""Shared machinery of the quadratic weight penalties (L2, EWC): anchors and importances."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from clsim.errors import ConfigError
from clsim.strategies.base import Strategy, Task
from clsim.strategies.params import ParamSpec, overlap, select_parameters

Tensors = dict[str, torch.Tensor]
Anchor = tuple[Tensors, Tensors | None]
FirstAnchor = Literal["pretrained", "start", "none"]


class AnchoredPenalty(Strategy):
    """Cross-entropy + lambda/2 * sum_k sum_i w_k,i (theta_i - theta*_k,i)^2.

    Each anchor k is a snapshot theta*_k of the selected parameters, with per-parameter
    importance w_k (None = 1, i.e. plain L2). Subclasses decide when anchors are taken after a
    task and what their importances are.

    The first task: the authors' code of "A Closer Look at Rehearsal-Free Continual Learning"
    (Smith et al. 2023; their ``init_task_param_reg``) regularises toward the pretrained weights
    from the first task on, not only from the second. ``first_task_anchor`` names the choice:
    'pretrained' (default) anchors at the weights the first task starts from when the model
    was built from pretrained weights, 'start' does so for any model, 'none' leaves the first
    task unpenalised (the classic L2 / EWC). That anchor's importance is
    :meth:`first_importance` (1 for L2; 0 for EWC's Fisher term, as in the authors' code).
    """

    keeps_parameter_state = True  # anchors and importances, per parameter position

    def __init__(self, *, lambda_: float, params: ParamSpec, mask_past: bool,
                 first_task_anchor: FirstAnchor = "pretrained"):
        if lambda_ < 0:
            raise ConfigError("strategy.lambda", f"expected a number >= 0, got {lambda_}")
        if first_task_anchor not in ("pretrained", "start", "none"):
            raise ConfigError("strategy.first_task_anchor", f"expected 'pretrained', 'start' or 'none', "
                                                            f"got {first_task_anchor!r}")
        self.lambda_ = lambda_
        self.params = params
        self.mask_past = mask_past
        self.first_task_anchor = first_task_anchor
        self.names: list[str] = []
        self.anchors = []

    @property
    def anchors(self) -> tuple[Anchor, ...]:
        """The (snapshot, importance) pairs; assigning them refolds the penalty."""
        return self._anchors

    @anchors.setter
    def anchors(self, value: list[Anchor] | tuple[Anchor, ...]) -> None:
        # a tuple, so the only way to change anchors is assignment, which keeps the fold current
        self._anchors = tuple(value)
        self._terms, self._constant = fold(self._anchors)

    def setup(self, model: nn.Module) -> None:
        self.names = select_parameters(model, self.params)

    def before_task(self, model: nn.Module, task: Task) -> Dataset:
        data = super().before_task(model, task)
        if not self.anchors and self.anchors_first_task(model):
            self.anchors = [(self.snapshot(model), self.first_importance(model))]
        return data

    def anchors_first_task(self, model: nn.Module) -> bool:
        """Whether the first task is penalised toward the weights it starts from."""
        if self.first_task_anchor == "none":
            return False
        return self.first_task_anchor == "start" or bool(getattr(model, "pretrained", False))

    def first_importance(self, model: nn.Module) -> Tensors | None:
        """The importance of the first-task anchor (None: 1, plain L2)."""
        return None

    def snapshot(self, model: nn.Module) -> Tensors:
        """Detached copies of the selected parameters."""
        params = dict(model.named_parameters())
        return {n: params[n].detach().clone() for n in self.names}

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """sum_k sum_i w_k,i (theta_i - theta*_k,i)^2, evaluated as one quadratic per parameter.

        sum_k w_k (x - a_k)^2 = W (x - m)^2 + c with W = sum_k w_k, m = sum_k w_k a_k / W and
        the constant c = sum_k w_k (a_k - m)^2, so a step costs the same with one anchor or
        fifty (EWC ``separate`` keeps one per task). Gradients are the same; the value agrees
        up to rounding. The fold is rebuilt whenever ``anchors`` is assigned.
        """
        params = dict(model.named_parameters())
        total = torch.zeros((), device=next(model.parameters()).device)
        for name, (weight, center) in self._terms.items():
            diff = (overlap(params[name], center) - center).pow(2)
            total = total + (diff if weight is None else weight * diff).sum()
        return total + self._constant

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Any = None) -> torch.Tensor:
        ce = super().loss(model, x, y, extra)
        if not self.anchors or self.lambda_ == 0:
            return ce
        return ce + 0.5 * self.lambda_ * self.penalty(model)

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": list(self.anchors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchors = state["anchors"]


def fold(anchors: tuple[Anchor, ...]) -> tuple[dict[str, tuple[torch.Tensor | None, torch.Tensor]], float]:
    """Per-parameter ``(W, m)`` and the constant c of ``sum_k w_k (x - a_k)^2`` (see ``penalty``)."""
    if len(anchors) == 1:  # nothing to fold: exactly the single anchor, no rounding
        anchor, importance = anchors[0]
        return {n: (None if importance is None else importance[n], a) for n, a in anchor.items()}, 0.0
    terms, constant = {}, 0.0
    for name in anchors[-1][0] if anchors else {}:
        weight, center, c = _fold_one([(a[name], None if w is None else w[name]) for a, w in anchors])
        terms[name], constant = (weight, center), constant + c
    return terms, constant


def _fold_one(pairs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(W, m, c)`` of one parameter over anchors of possibly smaller (older head) shapes.

    m is computed as a_ref + sum_k w_k (a_k - a_ref) / W around the newest full-size anchor
    a_ref, not as sum_k w_k a_k / W: where the anchors agree (old classes' head rows that
    ``mask_past`` froze) m is then a_ref exactly, so the penalty's gradient there is exactly 0.
    The plain weighted mean is off by rounding, and Adam scales that residue up to a full step.
    """
    shape = max((a.shape for a, _ in pairs), key=lambda s: s.numel())
    ref = next(a for a, _ in reversed(pairs) if a.shape == shape)
    W = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    Wd = torch.zeros_like(W)
    for a, w in pairs:
        rows = tuple(slice(0, s) for s in a.shape)  # a grown head keeps its old rows first
        w = torch.ones_like(a) if w is None else w
        W[rows] += w
        Wd[rows] += w * (a - ref[rows])
    center = ref + torch.where(W > 0, Wd / W.clamp_min(torch.finfo(W.dtype).tiny), torch.zeros_like(W))
    constant = sum(float((w_ * (a - overlap(center, a)).pow(2)).double().sum())
                   for a, w_ in ((a, torch.ones_like(a) if w is None else w) for a, w in pairs))
    return W, center, constant
