"""DeiT-LT against its public code (github.com/val-iisc/DeiT-LT): weighted losses by hand, the
soft-distillation scale, the in-distribution teacher, the CIFAR-LT geometry."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from clsim.config import parse_config
from clsim.errors import ConfigError
from clsim.losses import class_balanced_weights, soft_distillation_loss, weighted_cross_entropy
from clsim.models.deit import deit
from clsim.scenarios.base import Experience
from clsim.strategies.base import Task
from clsim.strategies.deit_lt import DeiTLT, DeiTLTTeacher

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
SHAPE, C = (3, 8, 8), 4
COUNTS = (40, 20, 8, 2)


def task(teacher=None) -> Task:
    class Targets:
        targets = np.repeat(np.arange(C), COUNTS)

    return Task(Experience(0, list(range(C)), Targets(), None), (), C, teacher)


def student():
    torch.manual_seed(0)
    model = deit(SHAPE, embed_dim=16, depth=1, num_heads=2, patch_size=2)
    model.grow(C)
    return model


# --------------------------------------------------------------------------- losses by hand


def test_weighted_soft_target_ce_by_hand_is_normalised_by_the_weights():
    # p = softmax([0, ln 2]) = [1/3, 2/3]; q = [1/2, 1/2]; w = [2, 1]
    logits, q, w = torch.tensor([[0.0, math.log(2)]]), torch.tensor([[0.5, 0.5]]), torch.tensor([2.0, 1.0])
    numerator = 2 * 0.5 * math.log(3) + 1 * 0.5 * math.log(3 / 2)  # -sum_c w_c q_c log p_c
    assert weighted_cross_entropy(logits, q, w).item() == pytest.approx(numerator / 1.5)  # sum_c w_c q_c = 1.5
    assert weighted_cross_entropy(logits, q, w, normalize="batch").item() == pytest.approx(numerator / 1)


def test_uniform_logits_give_log_c_whatever_the_weights_and_targets():
    # every log p = -log 3, so the weighted mean is log 3; the batch mean is log 3 * mean weight mass
    logits = torch.zeros(2, 3)
    q = torch.tensor([[0.8, 0.1, 0.1], [0.0, 0.5, 0.5]])
    w = torch.tensor([0.1, 1.0, 3.0])
    assert weighted_cross_entropy(logits, q, w).item() == pytest.approx(math.log(3))
    mass = (0.08 + 0.1 + 0.3 + 0.5 + 1.5) / 2  # sum_c w_c q_ic averaged over the batch
    assert weighted_cross_entropy(logits, q, w, normalize="batch").item() == pytest.approx(math.log(3) * mass)


def test_batch_normaliser_is_pytorchs_soft_target_ce_and_hard_labels_match_weighted_ce():
    g = torch.Generator().manual_seed(0)
    logits, w = torch.randn(5, C, generator=g), torch.rand(C, generator=g) + 0.1
    q = torch.softmax(torch.randn(5, C, generator=g), dim=1)
    torch.testing.assert_close(weighted_cross_entropy(logits, q, w, normalize="batch"),
                               F.cross_entropy(logits, q, weight=w))  # the reference's path for soft labels
    y = torch.tensor([0, 1, 3, 3, 2])
    torch.testing.assert_close(weighted_cross_entropy(logits, y, w), F.cross_entropy(logits, y, weight=w))
    torch.testing.assert_close(weighted_cross_entropy(logits, F.one_hot(y, C).float(), w),
                               F.cross_entropy(logits, y, weight=w))  # one-hot soft = hard
    torch.testing.assert_close(weighted_cross_entropy(logits, q), -(q * F.log_softmax(logits, 1)).sum(1).mean())


def test_soft_distillation_is_the_references_kl_sum_over_batch_times_classes():
    # teacher p = [1/4, 3/4], student p = [1/2, 1/2]: KL = 1/4 ln(1/2) + 3/4 ln(3/2)
    student_logits, teacher_logits = torch.zeros(1, 2), torch.tensor([[0.0, math.log(3)]])
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert soft_distillation_loss(student_logits, teacher_logits, 1.0).item() == pytest.approx(kl / 2)  # / (B C)
    # the reference's expression, literally: kl_div(sum) * T^2 / numel
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    T = 3.0
    reference = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="sum", log_target=True) * T * T / s.numel()
    torch.testing.assert_close(soft_distillation_loss(s, t, T), reference)


def test_weighted_soft_distillation_by_hand():
    # two samples: the teacher's argmax is class 0 for the first, class 1 for the second
    s = torch.zeros(2, 2)
    t = torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)]])  # p_t = [3/4, 1/4] and [1/4, 3/4]
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)  # the same for both (symmetric)
    w = torch.tensor([1.0, 3.0])
    assert soft_distillation_loss(s, t, 1.0, w).item() == pytest.approx((1 * kl + 3 * kl) / (4 * 2))
    t2 = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])  # second sample: KL 0, argmax class 0 (weight 1)
    assert soft_distillation_loss(s, t2, 1.0, w).item() == pytest.approx(kl / (2 * 2))


# --------------------------------------------------------------------------- the strategy


def test_no_teacher_drw_with_mixup_normalises_the_dist_loss_by_the_weights():
    model = student()
    strategy = DeiTLT(distillation="none", drw_epoch=0, no_mixup_drw=False, randaugment="", erase_prob=0.0)
    strategy.setup(model)
    strategy.before_task(model, task())
    torch.manual_seed(0)
    strategy.before_epoch(model, 0, 1, 1)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, *SHAPE, generator=g), torch.randint(0, C, (8,), generator=g)
    x, soft, extra = strategy.prepare_batch(x, y)
    assert soft.shape == (8, C)
    cls_logits, dist_logits = model.forward_both(x)
    w = class_balanced_weights(COUNTS, 0.9999)
    cls = -(soft * F.log_softmax(cls_logits, 1)).sum() / 8
    dist = -(soft * w * F.log_softmax(dist_logits, 1)).sum() / (soft * w).sum()
    torch.testing.assert_close(strategy.loss(model, x, soft, extra), 0.5 * cls + 0.5 * dist)
    batch_norm = DeiTLT(distillation="none", drw_epoch=0, weight_norm="batch")
    batch_norm.weights = w
    expected = 0.5 * cls + 0.5 * F.cross_entropy(dist_logits, soft, weight=w)
    torch.testing.assert_close(batch_norm.loss(model, x, soft, extra), expected)


def test_drw_cls_weights_the_cls_loss_too():
    model = student()
    strategy = DeiTLT(distillation="none", augment=False, drw_epoch=0, drw_cls=True)
    strategy.before_task(model, task())
    strategy.before_epoch(model, 0, 1, 1)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, *SHAPE, generator=g), torch.tensor([0, 0, 1, 2, 3, 3])
    cls_logits, dist_logits = model.forward_both(x)
    w = strategy.weights
    expected = 0.5 * F.cross_entropy(cls_logits, y, weight=w) + 0.5 * F.cross_entropy(dist_logits, y, weight=w)
    torch.testing.assert_close(strategy.loss(model, x, y, x), expected)


@pytest.mark.parametrize("kwargs, key", [({"teacher_input": "mixed"}, "strategy.teacher_input"),
                                         ({"weight_norm": "sum"}, "strategy.weight_norm"),
                                         ({"distillation": "kl"}, "strategy.distillation")])
def test_bad_choices_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError, match=f"^{key}: expected one of"):
        DeiTLT(**kwargs)


def test_the_old_ood_option_is_gone():
    with pytest.raises(TypeError):
        DeiTLT(ood=True)  # the paper's in/out-of-distribution is the teacher's training: deit_lt_teacher


def test_in_distribution_teacher_trains_on_the_strong_augmentations_with_logit_adjustment():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(SHAPE)), C))
    model.num_classes = C
    strategy = DeiTLTTeacher(erase_prob=1.0)
    strategy.before_task(model, task())
    strategy.before_epoch(model, 0, 1, 1)
    g = torch.Generator().manual_seed(4)
    clean, y = torch.randn(8, *SHAPE, generator=g), torch.randint(0, C, (8,), generator=g)
    x, soft, _ = strategy.prepare_batch(clean, y)
    assert not torch.allclose(x, clean) and soft.shape == (8, C)  # augmented, mixed targets
    prior = torch.log(torch.tensor(COUNTS, dtype=torch.float) / sum(COUNTS))
    expected = -(soft * F.log_softmax(model(x) + prior, 1)).sum(1).mean()
    torch.testing.assert_close(strategy.loss(model, x, soft, None), expected)
    plain = DeiTLTTeacher(loss="ce")
    plain.before_task(model, task())
    torch.testing.assert_close(plain.loss(model, x, soft, None), -(soft * F.log_softmax(model(x), 1)).sum(1).mean())


def test_in_distribution_teacher_is_a_valid_teacher_strategy():
    raw = yaml.safe_load((ROOT / "scenarios/synthetic_lt.yaml").read_text())
    raw["teacher"]["strategy"] = {"name": "deit_lt_teacher"}
    assert parse_config(raw).teacher.strategy.name == "deit_lt_teacher"


# --------------------------------------------------------------------------- CIFAR-LT geometry


@pytest.mark.parametrize("name, numbers", [("cifar10_lt", ("87.5", "85.0")), ("cifar100_lt", ("55.6", "31.4"))])
def test_cifar_lt_files_have_the_papers_geometry_and_numbers(name, numbers):
    path = ROOT / "scenarios" / f"{name}.yaml"
    text = path.read_text()
    config = parse_config(yaml.safe_load(text))
    assert config.data.kwargs["image_size"] == 224
    assert config.model.kwargs["patch_size"] == 16 and config.model.kwargs["arch"] == "deit_base_distilled_patch16_224"
    assert config.strategy.kwargs["teacher_input"] == "augmented"
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert all(n in header for n in numbers)
