"""DeiT-LT: a ViT's DIST token distilled from a flat CNN teacher on out-of-distribution images.

Rangwani et al., "DeiT-LT: Distillation Strikes Back for Vision Transformer Training on
Long-Tailed Datasets" (CVPR 2024); public code github.com/val-iisc/DeiT-LT (``losses.py``,
``engine.py``, ``main.py``), which this module follows. The student is DeiT (CLS + DIST tokens,
two heads; model ``deit``); the teacher is a CNN trained first (the run's ``teacher:`` section,
see :mod:`clsim.teacher`). Per batch (Sec. 3-4):

- the student's batch is strongly augmented (RandAugment, Mixup/CutMix, random erasing) and
  the teacher sees that same batch (``teacher_input: augmented``, the code's
  ``samples_teacher = samples_student``, resized to ``teacher_input_size`` when set, as the
  code's ``--teacher-size``): for a teacher trained without these augmentations the images are
  out of its training distribution (OOD), which is the paper's point: its predictions carry
  local, CNN-like features into the DIST token. The paper's in-distribution ablation is a
  teacher trained WITH the same strong augmentations: ``teacher: {strategy: {name:
  deit_lt_teacher}}`` (:class:`DeiTLTTeacher`). ``teacher_input: clean`` (the batch before strong
  augmentation, as in DeiT-style distillation of clean views) is an extra ablation, not the paper's;
- loss = (1 - alpha) * CE(CLS, mixed labels) + alpha * CE(DIST, argmax teacher) (hard, eq. 2),
  or tau^2 KL to the teacher's softened distribution divided by batch x classes (soft; the
  code's ``reduction='sum' / numel``, see :func:`clsim.losses.soft_distillation_loss`);
- from ``drw_epoch`` on, the DIST loss is class-balanced re-weighted (Cao et al.'s DRW with
  Cui et al.'s weights, by the teacher's label; the code's ``--weighted-distillation``), every
  weighted loss normalised by the sum of its weights (:func:`clsim.losses.weighted_cross_entropy`);
  the CLS head stays unweighted (``drw_cls``: the code's ``--weighted-baseloss``). With
  ``no_mixup_drw`` (the paper's CIFAR setting) the DRW epochs use the plain labels: no Mixup,
  CutMix or label smoothing (the code passes the raw targets to ``CrossEntropyLoss``).

Inference averages the two heads (``deit``'s forward); CLS-only and DIST-only accuracies are
reported as prediction variants. With ``distillation: none`` the DIST head learns the labels
like CLS (no teacher): the plain-ViT baseline on the same recipe, with DRW optional.

The teacher recipe. The paper's best CIFAR teachers are ResNet-32s trained with PaCo
(parametric contrastive learning, Cui et al. ICCV 2021) + SAM; its others use LDAM-DRW + SAM.
PaCo is not implemented: it is a MoCo-style method (a momentum encoder, a queue of 1,024 keys,
two augmented views per image, learnable class centres in the contrastive loss, the code's
``moco.builder`` around the ResNet), a training method of its own rather than a loss, and
clsim's teacher is an ordinary clsim run. The closest recipe clsim has, and the shipped CIFAR
files' teacher, is logit-adjusted CE (= balanced softmax at tau 1, which PaCo's classifier
branch also uses: its logits are trained with a prior-adjusted CE) with SAM (``sam_rho``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from clsim.data.strong_augment import DEIT_RANDAUGMENT, BatchMixup, StrongAugment, seed_global_generators
from clsim.errors import ConfigError
from clsim.losses import class_balanced_weights, log_prior, soft_distillation_loss, weighted_cross_entropy
from clsim.models.deit import DistilledIncrementalClassifier
from clsim.registry import STRATEGIES
from clsim.strategies.base import Batches, Strategy, Task

TeacherInput = Literal["augmented", "clean"]
Normalizer = Literal["weights", "batch"]


@STRATEGIES.register("deit_lt")
class DeiTLT(Strategy):
    """DeiT-LT training of a distilled DeiT (see the module docstring).

    Args:
        alpha: weight of the DIST loss; the CLS loss gets 1 - alpha (0.5 in the paper).
        distillation: 'hard' (teacher's argmax, the paper's), 'soft' (KL at ``temperature``)
            or 'none' (no teacher: DIST learns the labels too).
        temperature: softmax temperature of soft distillation.
        teacher_input: 'augmented' (the student's strongly augmented batch: DeiT-LT) or 'clean'
            (the batch before strong augmentation; an extra ablation). Whether that batch is
            in or out of the teacher's distribution depends on how the teacher was trained
            (``deit_lt_teacher``: with the same strong augmentations, i.e. in-distribution).
        augment: strong augmentation on (false: the batch as the data source gives it).
        randaugment: timm RandAugment config ('' for none).
        mixup / cutmix: Mixup and CutMix alphas (0 turns one off).
        label_smoothing: smoothing of the (mixed) labels of the CLS loss.
        erase_prob: random-erasing probability per image.
        drw: re-weight the DIST loss from ``drw_epoch`` on.
        drw_epoch: first re-weighted epoch (from 0); default 4/5 of the epochs, rounded down
            (the paper: 1100 of 1200).
        drw_cls: re-weight the CLS loss too in the DRW epochs (the code's ``--weighted-baseloss``;
            off in the paper's runs).
        beta: class-balanced weights' beta (0.9999).
        no_mixup_drw: plain labels (no Mixup/CutMix, no smoothing) in the re-weighted epochs
            (the paper's CIFAR setting).
        weight_norm: how a weighted loss on soft targets is normalised: 'weights' (by the sum of
            the weights, as every hard-label path) or 'batch' (by the batch size: PyTorch's
            ``CrossEntropyLoss(weight)`` on soft targets, which the code's ``distillation none``
            path with Mixup in DRW epochs gets).
        teacher_input_size: resize images to this side for the teacher (default: as they are).
    """

    required_model = ("deit", "dhvt_distilled")  # the models this strategy trains (read by generic tests)

    def __init__(
        self, *, alpha: float = 0.5, distillation: Literal["hard", "soft", "none"] = "hard",
        temperature: float = 1.0, teacher_input: TeacherInput = "augmented", augment: bool = True,
        randaugment: str = DEIT_RANDAUGMENT, mixup: float = 0.8, cutmix: float = 1.0,
        label_smoothing: float = 0.1, erase_prob: float = 0.25, drw: bool = True,
        drw_epoch: int | None = None, drw_cls: bool = False, beta: float = 0.9999, no_mixup_drw: bool = True,
        weight_norm: Normalizer = "weights", teacher_input_size: int | None = None,
    ):
        check_ranges(alpha=alpha, temperature=temperature, mixup=mixup, cutmix=cutmix,
                     label_smoothing=label_smoothing, erase_prob=erase_prob, drw_epoch=drw_epoch, beta=beta,
                     teacher_input_size=teacher_input_size)
        check_choice("distillation", distillation, ("hard", "soft", "none"))
        check_choice("teacher_input", teacher_input, ("augmented", "clean"))
        check_choice("weight_norm", weight_norm, ("weights", "batch"))
        self.alpha, self.distillation, self.temperature = alpha, distillation, temperature
        self.teacher_input = teacher_input
        self.mix_args = {"mixup": mixup, "cutmix": cutmix, "label_smoothing": label_smoothing}
        self.augment = StrongAugment(randaugment=randaugment, erase_prob=erase_prob) if augment else None
        self.drw, self.drw_epoch, self.drw_cls, self.beta = drw, drw_epoch, drw_cls, beta
        self.no_mixup_drw, self.weight_norm = no_mixup_drw, weight_norm
        self.teacher_input_size = teacher_input_size
        self.uses_teacher = distillation != "none"
        self.teacher: nn.Module | None = None
        self.counts: np.ndarray | None = None  # (C,) training images per class, this experience
        self.weights: torch.Tensor | None = None  # (C,) DRW weights; None before drw_epoch
        self.mixup: BatchMixup | None = None

    def setup(self, model: nn.Module) -> None:
        if not isinstance(model, DistilledIncrementalClassifier):
            raise ConfigError("model.name", f"deit_lt trains a CLS and a DIST head: use model 'deit' or "
                                            f"'dhvt_distilled' "
                                            f"(got {type(model).__name__})")

    def before_task(self, model: nn.Module, task: Task) -> Dataset:
        data = super().before_task(model, task)
        self.teacher = task.teacher
        if self.augment is not None:
            self.mixup = BatchMixup(model.num_classes, **self.mix_args)
        self.counts = np.bincount(np.asarray(data.targets), minlength=max(task.experience.classes) + 1)
        return data

    def before_epoch(self, model: nn.Module, epoch: int, epochs: int, steps: int) -> None:
        seed_global_generators()  # timm's augmentations draw from random / NumPy
        first = epochs * 4 // 5 if self.drw_epoch is None else self.drw_epoch
        reweight = self.drw and self.counts is not None and epoch >= first
        self.weights = class_balanced_weights(self.counts, self.beta) if reweight else None

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Strong augmentation once per step; labels become soft ``(B, C)`` targets (plain labels
        in DRW epochs with ``no_mixup_drw``); the clean batch goes to ``loss`` as ``extra``."""
        clean = x
        if self.augment is None:
            return x, y, clean
        x = self.augment(x)
        if self.no_mixup_drw and self.weights is not None:
            return x, y, clean  # the code: raw targets, no mixing, no smoothing (engine.py)
        return (*self.mixup(x, y), clean)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Any = None) -> torch.Tensor:
        cls_logits, dist_logits = model.forward_both(x)  # (B, C), (B, C)
        weight = self.class_weights(dist_logits)
        cls_loss = weighted_cross_entropy(cls_logits, y, weight if self.drw_cls else None, normalize=self.weight_norm)
        if self.distillation == "none":
            dist_loss = weighted_cross_entropy(dist_logits, y, weight, normalize=self.weight_norm)
        else:
            clean = x if extra is None else extra
            dist_loss = self.distillation_loss(dist_logits, self.teacher_logits(x, clean, dist_logits.shape[1]))
        return (1 - self.alpha) * cls_loss + self.alpha * dist_loss

    def teacher_logits(self, x: torch.Tensor, clean: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The frozen teacher on the student's batch or the clean one, ``(B, num_classes)``."""
        if self.teacher is None:
            raise RuntimeError("deit_lt: no teacher was given (the run gives it in each task)")
        images = x if self.teacher_input == "augmented" else clean
        if self.teacher_input_size and images.shape[-1] != self.teacher_input_size:
            size = (self.teacher_input_size, self.teacher_input_size)
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False)  # the code: Resize(bicubic)
        with torch.no_grad():
            return self.teacher(images)[:, :num_classes].float()

    def distillation_loss(self, dist_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Hard: CE to the teacher's argmax (weighted by its class in DRW, normalised by the
        weights' sum). Soft: tau^2 KL / (B x C), see :func:`clsim.losses.soft_distillation_loss`."""
        weight = self.class_weights(dist_logits)
        if self.distillation == "hard":
            return weighted_cross_entropy(dist_logits, teacher.argmax(dim=1), weight)
        return soft_distillation_loss(dist_logits, teacher, self.temperature, weight)

    def class_weights(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The DRW weights for ``logits``' classes, or None before ``drw_epoch``."""
        if self.weights is None:
            return None
        C = logits.shape[1]
        return F.pad(self.weights, (0, max(C - len(self.weights), 0)))[:C].to(logits.device)

    def after_task(self, model: nn.Module, task: Task, batches: Batches) -> None:
        self.counts, self.weights, self.teacher = None, None, None

    def predict(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cls_logits, dist_logits = model.forward_both(x)
        return (cls_logits + dist_logits) / 2, {"cls": cls_logits, "dist": dist_logits}


@STRATEGIES.register("deit_lt_teacher")
class DeiTLTTeacher(Strategy):
    """A teacher trained on the student's strong augmentations: DeiT-LT's in-distribution ablation.

    For ``teacher: {strategy: {name: deit_lt_teacher, ...}}``: the teacher run trains with the
    same RandAugment, Mixup/CutMix (label smoothing) and random erasing as the ``deit_lt``
    student, so the student's augmented batch is IN the teacher's training distribution (the
    paper's Table "in-distribution vs out-of-distribution distillation"). The loss on the
    (soft) targets is ``loss``: 'logit_adjust' (CE on logits shifted by tau log prior, the
    default and the shipped teachers' recipe) or 'ce'. Any model; combine with ``sam_rho``.

    Args:
        loss: 'logit_adjust' or 'ce'.
        tau: strength of the logit adjustment.
        randaugment / mixup / cutmix / label_smoothing / erase_prob: as for ``deit_lt``.
        mask_past: mask earlier classes' logits in the training loss.
    """

    def __init__(self, *, loss: Literal["logit_adjust", "ce"] = "logit_adjust", tau: float = 1.0,
                 randaugment: str = DEIT_RANDAUGMENT, mixup: float = 0.8, cutmix: float = 1.0,
                 label_smoothing: float = 0.1, erase_prob: float = 0.25, mask_past: bool = False):
        check_ranges(mixup=mixup, cutmix=cutmix, label_smoothing=label_smoothing, erase_prob=erase_prob)
        check_choice("loss", loss, ("logit_adjust", "ce"))
        if tau < 0:
            raise ConfigError("strategy.tau", f"expected a number >= 0, got {tau}")
        self.loss_name, self.tau, self.mask_past = loss, tau, mask_past
        self.mix_args = {"mixup": mixup, "cutmix": cutmix, "label_smoothing": label_smoothing}
        self.augment = StrongAugment(randaugment=randaugment, erase_prob=erase_prob)
        self.mixup: BatchMixup | None = None
        self.prior: torch.Tensor | None = None  # (C,) log prior (classes without images count one)

    def before_task(self, model: nn.Module, task: Task) -> Dataset:
        data = super().before_task(model, task)
        self.mixup = BatchMixup(model.num_classes, **self.mix_args)
        counts = np.bincount(np.asarray(data.targets), minlength=model.num_classes)
        self.prior = log_prior(np.maximum(counts, 1)) if self.loss_name == "logit_adjust" else None
        return data

    def before_epoch(self, model: nn.Module, epoch: int, epochs: int, steps: int) -> None:
        seed_global_generators()

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        return (*self.mixup(self.augment(x), y), None)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Any = None) -> torch.Tensor:
        logits = model(x)  # (B, C)
        if self.prior is not None and self.tau > 0:
            logits = logits + self.tau * self.prior.to(logits.device)[: logits.shape[1]]
        if self.mask_past and self.first_new_class > 0:  # earlier classes out of the softmax and the targets
            logits = logits[:, self.first_new_class:]
            if y.dim() == 1:  # hard labels (prepare_batch mixes them; a direct call may not)
                y = y - self.first_new_class
            else:
                y = y[:, self.first_new_class:] / y[:, self.first_new_class:].sum(1, keepdim=True).clamp_min(1e-12)
        return weighted_cross_entropy(logits, y)

    def after_task(self, model: nn.Module, task: Task, batches: Batches) -> None:
        self.mixup, self.prior = None, None


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    """A ConfigError naming ``strategy.key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"strategy.{key}", f"expected one of {', '.join(choices)}, got {value!r}")


def check_ranges(**values: Any) -> None:
    """One ConfigError naming the first out-of-range argument."""
    checks = {
        "alpha": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "temperature": (lambda v: v > 0, "a number > 0"),
        "mixup": (lambda v: v >= 0, "a number >= 0"),
        "cutmix": (lambda v: v >= 0, "a number >= 0"),
        "label_smoothing": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "erase_prob": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "drw_epoch": (lambda v: v is None or v >= 0, "an int >= 0 or null"),
        "beta": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "teacher_input_size": (lambda v: v is None or v >= 1, "an int >= 1 or null"),
    }
    for key, value in values.items():
        ok, expected = checks[key]
        if not ok(value):
            raise ConfigError(f"strategy.{key}", f"expected {expected}, got {value}")
