"""L2 regularisation toward the previous task's weights (and the pretrained ones on the first task)."""

from __future__ import annotations

from torch import nn

from clsim.registry import STRATEGIES
from clsim.strategies.anchored import AnchoredPenalty, FirstAnchor
from clsim.strategies.base import Batches, Task
from clsim.strategies.params import ParamSpec


@STRATEGIES.register("l2")
class L2(AnchoredPenalty):
    """L2 penalty to the previous task's weights (rehearsal-free baseline, Smith et al. 2023).

    "A Closer Look at Rehearsal-Free Continual Learning" (Smith et al., CVPR-W 2023) shows
    that this simple penalty, restricted to the self-attention blocks of a pretrained ViT
    (``params: attention``), is a strong rehearsal-free baseline on ImageNet-R. As in the
    authors' code, the first task is already penalised toward the pretrained weights
    (``first_task_anchor``), and each later task toward the weights after the previous one.

    Scale: the loss adds lambda/2 * ||theta - theta*||^2; the authors' code adds
    eps * ||theta - theta*||^2 (``MSELoss(reduction='none').sum()``), so lambda = 2 eps.

    Args:
        lambda: penalty weight (the loss adds lambda/2 * ||theta - theta_prev||^2).
        params: 'all', 'backbone', 'attention' or a list of parameter-name globs.
        mask_past: mask earlier classes' logits in the cross-entropy term.
        first_task_anchor: 'pretrained' (anchor the first task at a pretrained model's weights),
            'start' (at whatever weights it starts from) or 'none'.
    """

    def __init__(self, *, lambda_: float = 1.0, params: ParamSpec = "all", mask_past: bool = False,
                 first_task_anchor: FirstAnchor = "pretrained"):
        super().__init__(lambda_=lambda_, params=params, mask_past=mask_past, first_task_anchor=first_task_anchor)

    def after_task(self, model: nn.Module, task: Task, batches: Batches) -> None:
        self.anchors = [(self.snapshot(model), None)]
