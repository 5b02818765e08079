"""Gated class-attention (GCAB) with cascaded feature drift compensation (CFDC).

Cotogni et al., "Exemplar-free Continual Learning of Vision Transformers via Gated
Class-Attention and Cascaded Feature Drift Compensation" (arXiv 2211.12292; IJCV 2025). The
model is :class:`clsim.models.gcab.GCABClassifier` (``model: {name: gcab_vit}``); this strategy
trains it, with no replay buffer and no task id at test time:

- HAT gates on the class-attention block (Serra et al. 2018, as used by GCAB): within every
  epoch the gate scale anneals linearly over the batches, ``s = 1/s_max + (s_max - 1/s_max) b/B``;
  gradients of weights that earlier tasks' (hard, cumulative) gates use are masked (HAT's
  gradient conditioning); the gate embeddings' gradient is compensated for the annealing and
  clipped (HAT's embedding gradient compensation, ``thres_cosh``); embeddings are clamped to
  ``[-thres_emb, thres_emb]`` after each step; a sparsity regulariser (``lambda`` times the
  mean of the current gates over units earlier tasks left free) keeps capacity for later tasks;
- earlier tasks' tokens, gate embeddings, head rows and projectors are frozen, and so are the
  backbone's LayerNorms from the second task on (as in the public code);
- CFDC: for task t >= 1, projector ``P_t`` is trained so that ``P_t(f_t(x))`` matches the
  previous backbone's patch tokens ``f_{t-1}(x)`` on the current data; the same loss
  regularises the backbone. The loss is ``projector_weight * ||P_t(f_t) - f_{t-1}||_F``
  over the batch (Frobenius norm, not squared, as in the public code, weight 0.001 there).

Freezing is exact with any optimizer: masked gradients stop the gradient's own update, and
:meth:`GatedClassAttention.after_step` writes the frozen entries back from a snapshot taken
before the task, undoing what momentum and weight decay did to them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from clsim.errors import ConfigError
from clsim.models.gcab import S_MAX, GCABClassifier
from clsim.registry import STRATEGIES
from clsim.strategies.base import Batches, Prediction, Strategy, Task
from clsim.strategies.distillation import frozen_copy

Frozen = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (frozen entries (bool), values to keep)


@STRATEGIES.register("gcab_cfdc")
class GatedClassAttention(Strategy):
    """GCAB + CFDC (Cotogni et al. 2022): HAT-gated class-attention, cascaded drift projectors.

    Needs ``model: {name: gcab_vit}``. ``gcab`` is the same strategy with
    ``drift_compensation: false`` (the paper's GCAB-only ablation: the backbone trains freely
    and earlier tasks read the drifted features as they are).

    Args:
        s_max: largest gate scale; gates are ``sigmoid(s e)`` (paper: 800).
        lambda: weight of the gate sparsity regulariser (paper: 0.05).
        thres_cosh: clamp of ``s e`` in the embedding-gradient compensation (paper: 50).
        thres_emb: clamp of the gate embeddings after each step (paper: 6).
        clipgrad: max global gradient norm (paper's code: 10000, i.e. a guard only).
        drift_compensation: train CFDC projectors and use them at inference.
        projector_weight: weight of the projector loss (paper's code ``lambda_pfr``: 0.001).
        freeze_backbone: freeze the whole backbone after the first task (an extra ablation).
        project_in_training: earlier tasks' tokens read the projector chain in training too,
            as at inference (the paper's code does not; see docs/gcab.md), so the BCE negatives
            of old heads on new data act where old heads read at test time.
        classification_trains_projector: with ``project_in_training``, the classification
            loss also updates the newest projector (false: only the drift loss trains it, the
            classification gradient passes through it to the backbone; true collapsed the
            projector onto "reject" features on digits).
        bce: binary cross-entropy on one-hot targets over all seen classes (the default, as the
            public code's ``bce_loss``, which its GCAB options set); false: softmax cross-entropy.
    """

    required_model = "gcab_vit"  # the registered model this strategy trains (read by generic tests)

    def __init__(self, *, s_max: float = S_MAX, lambda_: float = 0.05, thres_cosh: float = 50.0,
                 thres_emb: float = 6.0, clipgrad: float = 10000.0, drift_compensation: bool = True,
                 projector_weight: float = 0.001, freeze_backbone: bool = False,
                 project_in_training: bool = False, classification_trains_projector: bool = False,
                 bce: bool = True):
        checks = [("s_max", s_max, s_max > 1, "a number > 1"), ("lambda", lambda_, lambda_ >= 0, "a number >= 0"),
                  ("thres_cosh", thres_cosh, thres_cosh > 0, "a number > 0"),
                  ("thres_emb", thres_emb, thres_emb > 0, "a number > 0"),
                  ("clipgrad", clipgrad, clipgrad > 0, "a number > 0"),
                  ("projector_weight", projector_weight, projector_weight >= 0, "a number >= 0")]
        for key, value, ok, expected in checks:
            if not ok:
                raise ConfigError(f"strategy.{key}", f"expected {expected}, got {value}")
        self.s_max, self.lambda_, self.thres_cosh, self.thres_emb = s_max, lambda_, thres_cosh, thres_emb
        self.clipgrad, self.drift_compensation = clipgrad, drift_compensation
        self.projector_weight, self.freeze_backbone = projector_weight, freeze_backbone
        self.project_in_training = project_in_training and drift_compensation
        self.classification_trains_projector = classification_trains_projector
        self.bce = bce
        self.old_backbone: nn.Module | None = None  # f_{t-1}: the backbone after the previous task
        self.step, self.steps = 0, 0  # batch index within the epoch, batches per epoch (for s)
        self._model: GCABClassifier | None = None
        self._frozen: Frozen = {}

    # ------------------------------------------------------------------ hooks

    def setup(self, model: nn.Module) -> None:
        if not isinstance(model, GCABClassifier):
            raise ConfigError("model.name", f"strategy '{self.name}' needs the '{self.required_model}' model "
                                            f"(gated class-attention), got {type(model).__name__}")
        self._model = model

    @property
    def name(self) -> str:
        return "gcab_cfdc" if self.drift_compensation else "gcab"

    def before_task(self, model: nn.Module, task: Task) -> Dataset:
        data = super().before_task(model, task)
        self._frozen = self.frozen_entries(model)
        return data

    def before_epoch(self, model: nn.Module, epoch: int, epochs: int, steps: int) -> None:
        self.step, self.steps = 0, steps  # HAT anneals s afresh within every epoch

    def gate_scale(self) -> float:
        """``s`` for the current batch: 1/s_max at the first batch of an epoch, ~s_max at its last."""
        return 1 / self.s_max + (self.s_max - 1 / self.s_max) * self.step / max(self.steps, 1)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Any = None) -> torch.Tensor:
        """Classification (CE or BCE) over all seen classes + gate sparsity + (CFDC) projector loss."""
        output = model.forward_train(x, self.gate_scale(), project=self.project_in_training,
                                     detach_projectors=not self.classification_trains_projector)
        loss = self.classification(output.logits, y) + self.sparsity(model, output.gates)
        if self.drift_compensation and self.old_backbone is not None and self.projector_weight > 0:
            loss = loss + self.projector_weight * self.drift_loss(model, x, output.patches)
        return loss

    def classification(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Softmax cross-entropy, or with ``bce`` a sigmoid per class against one-hot targets.

        ``y`` is ``(B,)`` labels or ``(B, C)`` soft targets (e.g. from Mixup in ``prepare_batch``).
        """
        if self.bce:
            targets = y.to(logits.dtype) if y.dim() == 2 else F.one_hot(y, logits.shape[1]).to(logits.dtype)
            return F.binary_cross_entropy_with_logits(logits, targets)
        return F.cross_entropy(self.training_logits(logits), y)

    def sparsity(self, model: GCABClassifier, gates: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """HAT's capacity regulariser: ``lambda * sum g (1 - a^{<t}) / sum (1 - a^{<t})`` over both gate vectors."""
        # from the model, not cached: earlier embeddings are frozen, so this is the same every
        # step, and a strategy restored from a checkpoint computes exactly the same term
        used = model.cumulative_gates(model.num_tasks - 1)  # ((D,), (hidden,))
        free = torch.cat([1 - used[0], 1 - used[1]])  # (D + hidden,) units no earlier task uses
        g = torch.cat(gates)  # (D + hidden,)
        return self.lambda_ * (g * free).sum() / free.sum().clamp(min=1)

    def drift_loss(self, model: GCABClassifier, x: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """``||P_t(f_t(x)) - f_{t-1}(x)||_F`` over the batch; trains P_t and steadies the backbone."""
        with torch.no_grad():
            old = self.old_backbone(x)  # (B, N, D)
        return torch.linalg.vector_norm(model.projectors[-1](patches) - old)

    def after_backward(self, model: nn.Module) -> None:
        """Mask frozen entries' gradients (HAT), compensate the embeddings' gradient, clip."""
        params = dict(model.named_parameters())
        for name, (frozen, _) in self._frozen.items():
            if params[name].grad is not None:
                params[name].grad.masked_fill_(frozen, 0)
        s, k = self.gate_scale(), model.gate_lr_scale
        for r in self.current_embeddings(model):
            if r.grad is not None:
                # d sigmoid(s e)/de vanishes for large s; rescale so the embedding keeps learning
                # (HAT's factor, on e = k r: the gradient wrt r is k times that wrt e)
                e = k * r.detach()
                num = torch.cosh(torch.clamp(s * e, -self.thres_cosh, self.thres_cosh)) + 1
                r.grad.mul_(self.s_max / s * num / (torch.cosh(e) + 1))
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.clipgrad)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """Clamp the current embeddings, put frozen entries back exactly, count the batch."""
        bound = self.thres_emb / model.gate_lr_scale  # |e| = k |r| <= thres_emb
        for r in self.current_embeddings(model):
            r.clamp_(-bound, bound)
        params = dict(model.named_parameters())
        for name, (frozen, kept) in self._frozen.items():
            params[name].copy_(torch.where(frozen, kept, params[name]))
        self.step += 1

    def predict(self, model: nn.Module, x: torch.Tensor) -> Prediction:
        """Every task's hard-gated logits, ``(B, classes seen)``; earlier tasks read the projector
        chain only with drift compensation (GCAB alone has no trained projectors: the public
        code builds none, and a fresh ``projector: paper`` is a random map).

        With drift compensation the run also scores the variant ``no_chain`` (``metrics.json``
        ``variants``): the same model with every task reading the current features, as in
        training. Right after a task it says whether the task was learnt but lost in the heads'
        competition through the chain (docs/gcab.md, "Why later tasks were not learnt").
        """
        patches = model.backbone(x)
        logits = model.logits_from_patches(patches, s=None, project=self.drift_compensation)
        if not self.drift_compensation:
            return logits
        return logits, {"no_chain": model.logits_from_patches(patches, s=None, project=False)}

    def after_task(self, model: nn.Module, task: Task, batches: Batches) -> None:
        if self.drift_compensation:
            self.old_backbone = frozen_copy(model.backbone)  # f_{t-1} for the next task's projector

    # ------------------------------------------------------------------ freezing

    @staticmethod
    def current_embeddings(model: GCABClassifier) -> list[nn.Parameter]:
        """The newest task's stored gate parameters ``r = e / k`` (attention, MLP)."""
        return [model.gate_attn[-1], model.gate_mlp[-1]]

    @torch.no_grad()
    def frozen_entries(self, model: GCABClassifier) -> Frozen:
        """Which entries of which parameters the task about to train must leave unchanged.

        The block's weights under earlier tasks' cumulative gates; earlier tasks' tokens, gate
        embeddings, head rows and projectors; from the second task, the backbone's LayerNorms
        (the public code freezes them) or, with ``freeze_backbone``, the whole backbone.
        """
        frozen: dict[str, torch.Tensor] = {}
        used = model.cumulative_gates(model.num_tasks - 1)  # ((D,), (hidden,)): HAT's a^{<t}
        for name, usage in model.block.usage(*used).items():
            frozen[f"block.{name}"] = usage > 0
        last = model.num_tasks - 1
        for task in range(last):
            for prefix in ("task_tokens", "gate_attn", "gate_mlp"):
                frozen[f"{prefix}.{task}"] = None
        old_rows = sum(model.task_sizes[:last])
        rows = torch.arange(model.num_classes, device=model.head.weight.device) < old_rows
        frozen["head.weight"], frozen["head.bias"] = rows[:, None].expand_as(model.head.weight), rows
        current_projector = last - 1 if self.drift_compensation else -1  # none trains without CFDC
        for name, _ in model.projectors.named_parameters():
            if int(name.split(".")[0]) != current_projector:
                frozen[f"projectors.{name}"] = None
        if last >= 1:
            for name, _ in model.backbone.named_parameters():
                if self.freeze_backbone or ".norm" in name:
                    frozen[f"backbone.{name}"] = None
        params = dict(model.named_parameters())
        return {name: self._entry(params[name], mask) for name, mask in frozen.items()}

    @staticmethod
    def _entry(param: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(frozen (bool, param's shape), snapshot)``; ``mask`` None freezes all of it."""
        if mask is None:
            mask = torch.ones_like(param, dtype=torch.bool)
        return mask.expand_as(param).clone(), param.detach().clone()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The previous backbone (CFDC's target) and the position in the epoch (for s)."""
        old = None if self.old_backbone is None else self.old_backbone.state_dict()
        return {"old_backbone": old, "step": self.step, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.steps = state["step"], state["steps"]
        self.old_backbone = None
        if state["old_backbone"] is not None:
            self.old_backbone = frozen_copy(self._model.backbone)  # same architecture
            self.old_backbone.load_state_dict(state["old_backbone"])


@STRATEGIES.register("gcab")
class GatedClassAttentionOnly(GatedClassAttention):
    """GCAB without drift compensation (the paper's ablation): HAT-gated class-attention only.

    Same arguments as ``gcab_cfdc``; ``drift_compensation`` defaults to false here.
    """

    def __init__(self, *, s_max: float = S_MAX, lambda_: float = 0.05, thres_cosh: float = 50.0,
                 thres_emb: float = 6.0, clipgrad: float = 10000.0, drift_compensation: bool = False,
                 projector_weight: float = 0.001, freeze_backbone: bool = False,
                 project_in_training: bool = False, classification_trains_projector: bool = False,
                 bce: bool = True):
        super().__init__(s_max=s_max, lambda_=lambda_, thres_cosh=thres_cosh, thres_emb=thres_emb,
                         clipgrad=clipgrad, drift_compensation=drift_compensation,
                         projector_weight=projector_weight, freeze_backbone=freeze_backbone,
                         project_in_training=project_in_training,
                         classification_trains_projector=classification_trains_projector, bce=bce)
