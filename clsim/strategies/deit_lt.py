"""DeiT-LT: a ViT's DIST token distilled from a flat CNN teacher on out-of-distribution images.

Rangwani et al., "DeiT-LT: Distillation Strikes Back for Vision Transformer Training on
Long-Tailed Datasets" (CVPR 2024). The student is DeiT (CLS + DIST tokens, two heads; model
``deit``); the teacher is a CNN trained first with SAM and a long-tail loss (the run's
``teacher:`` section, see :mod:`clsim.teacher`). Per batch (Sec. 3-4):

- both see the same strongly augmented images (RandAugment, Mixup/CutMix, random erasing):
  out of the teacher's training distribution, so its predictions carry local, CNN-like
  features into the DIST token (``ood``; off: the teacher sees the batch before augmentation);
- loss = (1 - alpha) * CE(CLS, mixed labels) + alpha * CE(DIST, argmax teacher) (hard, eq. 2),
  or the tau^2-scaled KL to the teacher's softened distribution (soft);
- from ``drw_epoch`` on, the DIST loss is class-balanced re-weighted (Cao et al.'s DRW with
  Cui et al.'s weights, by the teacher's label), so the DIST head leans to the tail while the
  CLS head stays unweighted and good on the head classes; Mixup/CutMix can stop then.

Inference averages the two heads (``deit``'s forward); CLS-only and DIST-only accuracies are
reported as prediction variants. With ``distillation: none`` the DIST head learns the mixed
labels like CLS (no teacher): the plain-ViT baseline on the same recipe, with DRW optional.
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
from clsim.losses import class_balanced_weights
from clsim.models.deit import DistilledIncrementalClassifier
from clsim.registry import STRATEGIES
from clsim.strategies.base import Batches, Strategy, Task


@STRATEGIES.register("deit_lt")
class DeiTLT(Strategy):
    """DeiT-LT training of a distilled DeiT (see the module docstring).

    Args:
        alpha: weight of the DIST loss; the CLS loss gets 1 - alpha (0.5 in the paper).
        distillation: 'hard' (teacher's argmax, the paper's), 'soft' (KL at ``temperature``)
            or 'none' (no teacher: DIST learns the labels too).
        temperature: softmax temperature of soft distillation.
        ood: the teacher sees the strongly augmented batch (DeiT-LT); false: the batch before
            strong augmentation (in-distribution distillation, as in DeiT).
        augment: strong augmentation on (false: the batch as the data source gives it).
        randaugment: timm RandAugment config ('' for none).
        mixup / cutmix: Mixup and CutMix alphas (0 turns one off).
        label_smoothing: smoothing of the (mixed) labels of the CLS loss.
        erase_prob: random-erasing probability per image.
        drw: re-weight the DIST loss from ``drw_epoch`` on.
        drw_epoch: first re-weighted epoch (from 0); default 4/5 of the epochs, rounded down
            (the paper: 1100 of 1200).
        beta: class-balanced weights' beta (0.9999).
        no_mixup_drw: stop Mixup/CutMix in the re-weighted epochs (the paper's CIFAR setting).
        teacher_input_size: resize images to this side for the teacher (default: as they are).
    """

    required_model = "deit"  # the registered model this strategy trains (read by generic tests)

    def __init__(
        self, *, alpha: float = 0.5, distillation: Literal["hard", "soft", "none"] = "hard",
        temperature: float = 1.0, ood: bool = True, augment: bool = True,
        randaugment: str = DEIT_RANDAUGMENT, mixup: float = 0.8, cutmix: float = 1.0,
        label_smoothing: float = 0.1, erase_prob: float = 0.25, drw: bool = True,
        drw_epoch: int | None = None, beta: float = 0.9999, no_mixup_drw: bool = True,
        teacher_input_size: int | None = None,
    ):
        check_ranges(alpha=alpha, temperature=temperature, mixup=mixup, cutmix=cutmix,
                     label_smoothing=label_smoothing, erase_prob=erase_prob, drw_epoch=drw_epoch, beta=beta,
                     teacher_input_size=teacher_input_size)
        self.alpha, self.distillation, self.temperature, self.ood = alpha, distillation, temperature, ood
        self.mix_args = {"mixup": mixup, "cutmix": cutmix, "label_smoothing": label_smoothing}
        self.augment = StrongAugment(randaugment=randaugment, erase_prob=erase_prob) if augment else None
        self.drw, self.drw_epoch, self.beta, self.no_mixup_drw = drw, drw_epoch, beta, no_mixup_drw
        self.teacher_input_size = teacher_input_size
        self.uses_teacher = distillation != "none"
        self.teacher: nn.Module | None = None
        self.counts: np.ndarray | None = None  # (C,) training images per class, this experience
        self.weights: torch.Tensor | None = None  # (C,) DRW weights; None before drw_epoch
        self.mixup: BatchMixup | None = None

    def setup(self, model: nn.Module) -> None:
        if not isinstance(model, DistilledIncrementalClassifier):
            raise ConfigError("model.name", f"deit_lt trains a CLS and a DIST head: use model 'deit' "
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
        """Strong augmentation once per step; labels become soft ``(B, C)`` targets; the clean
        batch goes to ``loss`` as ``extra`` (the teacher's input when ``ood`` is off)."""
        clean = x
        if self.augment is None:
            return x, y, clean
        x = self.augment(x)
        if self.no_mixup_drw and self.weights is not None:
            return x, self.mixup.smooth(y), clean
        return (*self.mixup(x, y), clean)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Any = None) -> torch.Tensor:
        cls_logits, dist_logits = model.forward_both(x)  # (B, C), (B, C)
        cls_loss = F.cross_entropy(cls_logits, y)  # y: class indices or soft targets (B, C)
        if self.distillation == "none":
            dist_loss = F.cross_entropy(dist_logits, y, weight=self.class_weights(dist_logits))
        else:
            clean = x if extra is None else extra
            dist_loss = self.distillation_loss(dist_logits, self.teacher_logits(x, clean, dist_logits.shape[1]))
        return (1 - self.alpha) * cls_loss + self.alpha * dist_loss

    def teacher_logits(self, x: torch.Tensor, clean: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The frozen teacher on the student's batch (OOD) or the clean one, ``(B, num_classes)``."""
        if self.teacher is None:
            raise RuntimeError("deit_lt: no teacher was given (the run gives it in each task)")
        images = x if self.ood else clean
        if self.teacher_input_size and images.shape[-1] != self.teacher_input_size:
            size = (self.teacher_input_size, self.teacher_input_size)
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        with torch.no_grad():
            return self.teacher(images)[:, :num_classes].float()

    def distillation_loss(self, dist_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Hard: CE to the teacher's argmax (weighted by its class in DRW). Soft: tau^2 KL."""
        target = teacher.argmax(dim=1)  # (B,)
        weight = self.class_weights(dist_logits)
        if self.distillation == "hard":
            return F.cross_entropy(dist_logits, target, weight=weight)
        t = self.temperature
        kl = F.kl_div(F.log_softmax(dist_logits / t, dim=1), F.log_softmax(teacher / t, dim=1),
                      reduction="none", log_target=True).sum(dim=1) * t * t  # (B,)
        w = torch.ones_like(kl) if weight is None else weight[target]
        return (w * kl).sum() / w.sum().clamp_min(1e-12)  # weighted mean, as weighted CE

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
