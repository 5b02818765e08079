"""Frozen-backbone strategies: L2P, DualPrompt, CODA-Prompt and a linear probe.

The methods "A Closer Look at Rehearsal-Free Continual Learning" (Smith et al., CVPR-W 2023)
compares L2 with, as the CODA-Prompt code base (GT-RIPL/CODA-Prompt, ``learners/prompt.py``)
trains them: the pretrained ViT stays frozen, only the prompts and the head train, with
cross-entropy over the current task's classes (earlier classes' logits masked, ``mask_past``)
plus the method's own loss. The models are in :mod:`clsim.models.prompt_vit`.

Each strategy freezes the backbone itself in ``setup`` (``requires_grad = False``), so the
engine's optimizer (:mod:`clsim.engine.param_groups`) never sees it, whatever ``train`` says.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from clsim.errors import ConfigError
from clsim.models.prompt_vit import CodaPool, PromptClassifier
from clsim.registry import STRATEGIES
from clsim.strategies.base import Prediction, Strategy, Task


def _weight(key: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ConfigError(f"strategy.{key}", f"expected a number >= 0, got {value!r}")
    return float(value)


def freeze(module: nn.Module) -> None:
    """No parameter of ``module`` trains (the engine's optimizer skips them)."""
    for p in module.parameters():
        p.requires_grad_(False)


class PromptStrategy(Strategy):
    """Shared by the prompting methods: freeze the ViT, set the task, CE (+ the method's losses).

    Subclasses name their model (``required_model``) and how the prompt module's raw losses
    are weighted (:meth:`extra_loss`).
    """

    kind = ""
    freezes_backbone = True  # the pretrained ViT (model.backbone.vit) never trains

    def __init__(self, *, mask_past: bool = True):
        self.mask_past = mask_past

    def setup(self, model: nn.Module) -> None:
        if not isinstance(model, PromptClassifier) or model.prompt.kind != self.kind:
            raise ConfigError("model.name", f"this strategy trains the '{self.required_model}' model, "
                                            f"got a {type(model).__name__}")
        freeze(model.backbone.vit)  # the pretrained ViT never trains: only prompts and head

    def before_task(self, model: nn.Module, task: Task) -> Dataset:
        model.prompt.start_task(task.index)
        return super().before_task(model, task)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Any = None) -> torch.Tensor:
        logits, losses = model.logits_and_losses(x, train=True)
        return F.cross_entropy(self.training_logits(logits), y) + self.extra_loss(losses)

    def extra_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """The method's weighted extra loss from the prompt module's raw ``losses``."""
        return 0.0

    def predict(self, model: nn.Module, x: torch.Tensor) -> Prediction:
        return model.logits_and_losses(x, train=False)[0]


@STRATEGIES.register("l2p")
class L2P(PromptStrategy):
    """L2P (Wang et al., CVPR 2022) as "L2P++" (prefix-tuning at layer 0; model ``l2p_vit``).

    Loss: CE + ``pull_weight`` x the key pull loss ``sum_b sum_{m in topk} (1 - cos(q_b, k_m))``
    (L2P eq. 5's surrogate term; the CODA-Prompt code adds it with weight 1, summed over the batch).

    Args:
        pull_weight: weight of the key pull loss (lambda of L2P eq. 5).
        mask_past: mask earlier classes' logits in the CE (the CODA-Prompt code does).
    """

    required_model = "l2p_vit"
    kind = "l2p"

    def __init__(self, *, pull_weight: float = 1.0, mask_past: bool = True):
        super().__init__(mask_past=mask_past)
        self.pull_weight = _weight("pull_weight", pull_weight)

    def extra_loss(self, losses):
        return self.pull_weight * losses["pull"]


@STRATEGIES.register("dualprompt")
class DualPrompt(L2P):
    """DualPrompt (Wang et al., ECCV 2022; model ``dualprompt_vit``): G-prompt + per-task E-prompts.

    Training uses the task's own E-prompt (the task id is known while training) and pulls its
    key toward the queries; prediction picks the nearest key's E-prompt (no task id).

    Args:
        pull_weight: weight of the key matching loss (the CODA-Prompt code: 1).
        mask_past: mask earlier classes' logits in the CE (the CODA-Prompt code does).
    """

    required_model = "dualprompt_vit"
    kind = "dualprompt"


@STRATEGIES.register("coda_prompt")
class CodaPrompt(PromptStrategy):
    """CODA-Prompt (Smith et al., CVPR 2023; model ``coda_prompt_vit``).

    Each task allocates its own components (Gram-Schmidt initialised, orthogonal to the earlier
    ones); the earlier tasks' components get no gradient (detached in the forward pass) and
    are put back after every optimizer step, so weight decay cannot move them either.
    Loss: CE + ``ortho_weight`` x the orthogonality penalty of K, A and P (CODA-P eq. 5).

    Args:
        ortho_weight: weight of the orthogonality penalty. The authors' published command uses
            0.0 ("with updated code, now can be 0": the per-task Gram-Schmidt init replaces it).
        mask_past: mask earlier classes' logits in the CE (the CODA-Prompt code does).
    """

    required_model = "coda_prompt_vit"
    kind = "coda"

    def __init__(self, *, ortho_weight: float = 0.0, mask_past: bool = True):
        super().__init__(mask_past=mask_past)
        self.ortho_weight = _weight("ortho_weight", ortho_weight)
        self._frozen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def before_task(self, model: nn.Module, task: Task) -> Dataset:
        data = super().before_task(model, task)
        pool: CodaPool = model.prompt
        start, _ = pool.span(task.index)
        self._frozen = [(p, p.detach()[:, :start].clone()) for p in (pool.prompts, pool.keys, pool.attention)]
        return data

    def extra_loss(self, losses):
        return self.ortho_weight * losses["ortho"] if self.ortho_weight else 0.0

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for param, old in self._frozen:  # earlier tasks' components, bit for bit
            param[:, : old.shape[1]] = old


@STRATEGIES.register("linear_probe")
class LinearProbe(Strategy):
    """Frozen backbone, only the linear head trains: the pretrained features' baseline.

    Works with any model (the backbone is ``model.backbone``); CE over the seen classes with
    earlier classes masked (``mask_past``, as the rehearsal-free code trains its heads).

    Args:
        mask_past: mask earlier classes' logits in the CE.
    """

    freezes_backbone = True  # nothing but the head moves

    def __init__(self, *, mask_past: bool = True):
        self.mask_past = mask_past

    def setup(self, model: nn.Module) -> None:
        freeze(model.backbone)

    def before_epoch(self, model: nn.Module, epoch: int, epochs: int, steps: int) -> None:
        # a frozen backbone keeps its BatchNorm statistics and runs without dropout
        model.backbone.eval()
