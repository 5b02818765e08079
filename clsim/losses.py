"""Long-tail-aware losses and class weights: pure functions of tensors and class counts.

``counts`` is the number of training images per class, index = learner label (e.g.
``np.bincount(dataset.targets, minlength=C)``). A class may have none: a growing head keeps
the classes of earlier experiences, which the current experience has no images of. Each
function says what it does with such a class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Counts = Sequence[int] | np.ndarray | torch.Tensor


def _counts(counts: Counts) -> torch.Tensor:
    """``counts`` as a float64 CPU tensor (C,), checked: no negative entries, not all zero."""
    n = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    if n.ndim != 1 or len(n) == 0:
        raise ValueError(f"expected a 1-d sequence of per-class counts, got shape {tuple(n.shape)}")
    if (n < 0).any() or n.sum() == 0:
        raise ValueError(f"expected counts >= 0 with at least one > 0, got {n.tolist()}")
    return n


def class_balanced_weights(counts: Counts, beta: float = 0.9999) -> torch.Tensor:
    """Per-class loss weights from the effective number of samples (Cui et al., CVPR 2019).

    "Class-Balanced Loss Based on Effective Number of Samples", eq. 3-4: a class with n_c
    images has effective number E_c = (1 - beta^n_c) / (1 - beta), and weight
    w_c = 1 / E_c = (1 - beta) / (1 - beta^n_c), normalised so that sum_c w_c = C. beta = 0
    gives uniform weights; beta -> 1 gives w_c proportional to 1 / n_c (inverse frequency).
    Cao et al.'s deferred re-weighting (DRW) uses these weights with beta = 0.9999.

    A class with no images (E_c = 0) gets weight 0: no sample carries its label, so its
    weight never enters a loss; the normalisation is then over the C' classes that have
    images (sum_c w_c = C', the number of classes with n_c > 0; C' = C in Cui et al.).

    Args:
        counts: ``(C,)`` training images per class.
        beta: in [0, 1).

    Returns:
        ``(C,)`` float32 weights on the CPU.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = _counts(counts)
    present = n > 0
    # 1 - beta^n computed as -expm1(n log beta): exact enough near beta = 1 (1 - 0.9999^n is
    # tiny for small n); beta = 0 gives 1 - 0^n = 1 for every n >= 1.
    effective = -torch.expm1(n * np.log(beta)) if beta > 0 else torch.ones_like(n)
    w = torch.where(present, (1.0 - beta) / torch.where(present, effective, 1.0), 0.0)
    return (w * present.sum() / w.sum()).float()


def log_prior(counts: Counts) -> torch.Tensor:
    """log pi_c = log(n_c / sum_k n_k): the log class prior of the training data.

    A class with no images has prior 0 and log prior -inf: in
    :func:`logit_adjusted_cross_entropy` it then drops out of the softmax. For a finite
    adjustment instead, count it as one image first (``np.maximum(counts, 1)``), as the
    ``logit_adjust`` strategy does.

    Returns:
        ``(C,)`` float32 on the CPU.
    """
    n = _counts(counts)
    return (n / n.sum()).log().float()


def logit_adjusted_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, log_prior: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """Cross-entropy on prior-shifted logits: CE(f(x) + tau * log pi, y), mean over the batch.

    Menon et al., ICLR 2021, "Long-tail learning via logit adjustment", eq. 10: training
    the plain logits f through this loss makes argmax_y f_y(x) estimate the balanced-error
    Bayes classifier, so prediction stays the plain argmax (no adjustment at test time).
    With tau = 1 this is the balanced softmax of Ren et al., NeurIPS 2020. A uniform prior
    shifts every logit equally and gives plain cross-entropy.

    A class with log prior -inf (no training images) gets probability 0 in the softmax and no
    gradient; a label of such a class would have infinite loss (it cannot occur when the
    prior comes from the data trained on). tau = 0 is plain cross-entropy even then.

    Args:
        logits: ``(B, C)``.
        y: ``(B,)`` labels in [0, C).
        log_prior: ``(C,)`` log class prior (:func:`log_prior`); moved to ``logits``' device.
        tau: temperature of the adjustment, >= 0.
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if tau == 0:  # 0 * -inf would be nan
        return F.cross_entropy(logits, y)
    # float32 shift: bfloat16 logits (autocast) are promoted rather than the prior rounded
    shift = tau * log_prior.to(logits.device)  # (C,)
    return F.cross_entropy(logits + shift, y)


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, *,
    normalize: str = "weights",
) -> torch.Tensor:
    """Class-weighted cross-entropy for hard labels or soft targets, with a chosen normaliser.

    Per sample, ``l_i = -sum_c w_c q_ic log p_ic`` (``q_i`` = the one-hot label or the soft
    target, ``p_i = softmax(logits_i)``). ``normalize``:

    - ``"weights"``: ``sum_i l_i / sum_i sum_c w_c q_ic``. For hard labels this is exactly
      ``F.cross_entropy(logits, y, weight=w)`` (sum_i w_yi l_i / sum_i w_yi, as Cao et al.'s and
      DeiT-LT's DRW code); for soft targets (Mixup / CutMix / label smoothing) it is the same
      weighted mean, each sample counting with its target's expected weight.
    - ``"batch"``: ``sum_i l_i / B``: what ``F.cross_entropy`` (and ``nn.CrossEntropyLoss``)
      compute for soft targets with a weight; DeiT-LT's code reaches it only in its
      ``distillation-type none`` path with Mixup on (``CrossEntropyLoss(weight)`` on mixed
      labels). On a long tail, sum_c w_c q_ic is far below 1 for most samples (the head's
      weights are small), so this scales the loss down.

    Without ``weight`` both are the plain mean (timm's ``SoftTargetCrossEntropy`` for soft targets).

    Args:
        logits: ``(B, C)``.
        target: ``(B,)`` class indices or ``(B, C)`` soft targets (rows summing to 1).
        weight: ``(C,)`` class weights or None.
        normalize: ``"weights"`` or ``"batch"``.
    """
    if normalize not in ("weights", "batch"):
        raise ValueError(f"normalize must be 'weights' or 'batch', got {normalize!r}")
    logp = F.log_softmax(logits.float(), dim=1)  # (B, C)
    q = F.one_hot(target, logits.shape[1]).to(logp.dtype) if target.dim() == 1 else target.to(logp.dtype)
    wq = q if weight is None else q * weight.to(logp.device, logp.dtype)  # (B, C)
    total = -(wq * logp).sum()
    if normalize == "batch" or weight is None:
        return total / len(logits)
    return total / wq.sum().clamp_min(1e-12)


def soft_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeiT's soft distillation, scaled as DeiT's and DeiT-LT's code: ``tau^2 KL`` per element.

    ``tau^2 * sum_{i,c} KL_ic / (B * C)`` with ``KL_ic = p^t_ic (log p^t_ic - log p^s_ic)`` at
    temperature ``tau``: the code's ``F.kl_div(..., reduction='sum') * T * T / outputs.numel()``
    (the "legacy" elementwise mean, i.e. ``reduction='mean'``, which is ``'batchmean'`` / C).

    With ``weight`` (``(C,)``, DRW), sample i counts with ``w[argmax teacher_i]`` and the sum is
    divided by ``C * sum_i w[argmax teacher_i]`` instead of ``C * B``: the weighted mean over
    samples, normalised by the sum of the weights as hard distillation's weighted CE is, and
    equal to the unweighted loss when all weights are 1. (DeiT-LT's code instead multiplies
    the teacher's log-probabilities by the weights and renormalises them by their row sum,
    which does not give a distribution; not reproduced.)

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)`` (no gradient needed).
        temperature: tau > 0.
        weight: ``(C,)`` class weights or None.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                  reduction="none", log_target=True).sum(dim=1)  # (B,)
    classes = student_logits.shape[1]
    if weight is None:
        return kl.sum() * t * t / (len(kl) * classes)
    w = weight.to(kl.device, kl.dtype)[teacher_logits.argmax(dim=1)]  # (B,)
    return (w * kl).sum() * t * t / (w.sum().clamp_min(1e-12) * classes)
