"""Long-tail losses by hand, and the strategies built on them (logit_adjust, drw)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clsim.config import TrainConfig
from clsim.data.base import ArrayDataset
from clsim.engine.engine import Engine
from clsim.errors import ConfigError
from clsim.losses import class_balanced_weights, log_prior, logit_adjusted_cross_entropy
from clsim.models.small import mlp
from clsim.scenarios.base import Experience
from clsim.strategies.base import Task
from clsim.strategies.drw import DRW
from clsim.strategies.logit_adjust import LogitAdjust

pytestmark = pytest.mark.usefixtures("single_thread")


def logits_and_labels(B: int = 12, C: int = 4, *, seed: int = 0, labels=None):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (B,), generator=gen) if labels is None else torch.as_tensor(labels)
    return torch.randn(len(y), C, generator=gen), y


# --------------------------------------------------------------------------- class-balanced weights


def test_class_balanced_weights_by_hand():
    # beta = 0.5, counts (1, 2, 4): E_n = (1 - 0.5^n) / (1 - 0.5) = 1, 1.5, 1.875
    # w = 1 / E = 1, 2/3, 8/15 (= 15/15, 10/15, 8/15; sum 33/15); scaled to sum 3: x 15/11
    w = class_balanced_weights([1, 2, 4], beta=0.5)
    torch.testing.assert_close(w, torch.tensor([15 / 11, 10 / 11, 8 / 11]))
    assert w.sum().item() == pytest.approx(3.0) and w.dtype == torch.float32


def test_class_balanced_weights_near_one_are_inverse_frequency():
    # beta = 0.9999: 1 - beta^100 = 0.00995017, 1 - beta^10 = 0.00099955; ratio 9.9546
    w = class_balanced_weights(np.array([100, 10]), beta=0.9999)
    assert (w[1] / w[0]).item() == pytest.approx(0.00995017 / 0.00099955, rel=1e-4)
    assert w.sum().item() == pytest.approx(2.0)
    w = class_balanced_weights([1000, 100, 10, 1], beta=0.999999)  # -> 1 / n_c, up to scale
    torch.testing.assert_close(w / w[3], torch.tensor([1e-3, 1e-2, 1e-1, 1.0]), rtol=1e-3, atol=0)


@pytest.mark.parametrize("beta", [0.0, 1e-9])
def test_class_balanced_weights_small_beta_is_uniform(beta):
    torch.testing.assert_close(class_balanced_weights([500, 20, 3, 1], beta=beta), torch.ones(4))


def test_class_balanced_weights_of_absent_classes_are_zero():
    # the classes with images are weighted as on their own (15/11, 10/11, 8/11, sum 3)
    w = class_balanced_weights(torch.tensor([0, 1, 2, 0, 4]), beta=0.5)
    torch.testing.assert_close(w, torch.tensor([0.0, 15 / 11, 10 / 11, 0.0, 8 / 11]))
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("counts, beta", [([3, -1], 0.9), ([0, 0], 0.9), ([], 0.9), ([3, 4], 1.0),
                                          ([3, 4], -0.1)])
def test_class_balanced_weights_reject_bad_input(counts, beta):
    with pytest.raises(ValueError):
        class_balanced_weights(counts, beta=beta)


# --------------------------------------------------------------------------- logit adjustment


def test_log_prior_by_hand():
    # counts (1, 3, 0): pi = (1/4, 3/4, 0)
    lp = log_prior([1, 3, 0])
    torch.testing.assert_close(lp[:2], torch.tensor([math.log(0.25), math.log(0.75)]))
    assert lp[2].item() == -math.inf


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_logit_adjusted_ce_is_ce_on_shifted_logits(tau):
    logits, y = logits_and_labels()
    lp = log_prior([50, 20, 5, 1])
    expected = F.cross_entropy(logits + tau * lp, y)
    torch.testing.assert_close(logit_adjusted_cross_entropy(logits, y, lp, tau), expected)
    assert not torch.allclose(expected, F.cross_entropy(logits, y))


def test_logit_adjusted_ce_with_tau_one_is_the_balanced_softmax():
    # Ren et al.: -log(n_y e^{f_y} / sum_c n_c e^{f_c})
    logits, y = logits_and_labels()
    n = torch.tensor([50.0, 20.0, 5.0, 1.0])
    weighted = n * logits.exp()  # (B, C)
    by_hand = -(weighted.gather(1, y[:, None]).squeeze(1) / weighted.sum(1)).log().mean()
    torch.testing.assert_close(logit_adjusted_cross_entropy(logits, y, log_prior(n), 1.0), by_hand)


def test_logit_adjusted_ce_with_a_uniform_prior_or_tau_zero_is_plain_ce():
    logits, y = logits_and_labels()
    ce = F.cross_entropy(logits, y)
    torch.testing.assert_close(logit_adjusted_cross_entropy(logits, y, log_prior([7, 7, 7, 7])), ce)
    assert torch.equal(logit_adjusted_cross_entropy(logits, y, log_prior([50, 20, 5, 1]), 0.0), ce)
    with pytest.raises(ValueError):
        logit_adjusted_cross_entropy(logits, y, log_prior([7, 7, 7, 7]), -1.0)


def test_a_class_without_images_drops_out_of_the_adjusted_softmax():
    logits, y = logits_and_labels(labels=[1, 2, 3, 1, 2])
    logits.requires_grad_(True)
    lp = log_prior([0, 4, 2, 2])  # class 0: prior 0, log prior -inf
    loss = logit_adjusted_cross_entropy(logits, y, lp)
    expected = F.cross_entropy(logits[:, 1:] + lp[1:], y - 1)  # CE over classes 1..3 only
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[:, 0], torch.zeros(5))  # no gradient pushes it down
    # tau = 0 is plain CE even with a -inf entry (no 0 * -inf = nan)
    torch.testing.assert_close(logit_adjusted_cross_entropy(logits, y, lp, 0.0), F.cross_entropy(logits, y))


# --------------------------------------------------------------------------- strategies


def experience_with(labels, classes) -> Experience:
    labels = np.asarray(labels)
    return Experience(0, tuple(classes), ArrayDataset(torch.zeros(len(labels), 1, 2, 2), labels), None)


def task_with(labels, classes) -> Task:
    """The task of :func:`experience_with` (its training labels are what the strategies count)."""
    return Task(experience_with(labels, classes), seen_classes=max(classes) + 1)


def giving(logits: torch.Tensor):
    """A stand-in model whose forward pass returns ``logits`` (the loss hook runs the forward)."""
    return lambda x: logits


def test_logit_adjust_loss_follows_the_training_prior():
    logits, y = logits_and_labels(labels=[0, 1, 2, 0, 0, 1])
    imbalanced = LogitAdjust(tau=1.0)
    data = imbalanced.before_task(None, task_with([0] * 30 + [1] * 6 + [2] * 2, (0, 1, 2)))
    assert len(data) == 38
    loss = imbalanced.loss(giving(logits[:, :3]), None, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, :3] + log_prior([30, 6, 2]), y))
    assert abs(loss.item() - F.cross_entropy(logits[:, :3], y).item()) > 1e-3

    balanced = LogitAdjust(tau=1.0)
    balanced.before_task(None, task_with([0, 1, 2] * 5, (0, 1, 2)))
    torch.testing.assert_close(balanced.loss(giving(logits[:, :3]), None, y), F.cross_entropy(logits[:, :3], y))

    x = torch.randn(3, 4)
    model = torch.nn.Linear(4, 3)
    assert torch.equal(imbalanced.predict(model, x), model(x))  # prediction is not adjusted
    imbalanced.after_task(model, None, lambda: iter([]))  # the prior is the experience's only
    torch.testing.assert_close(imbalanced.loss(giving(logits[:, :3]), None, y), F.cross_entropy(logits[:, :3], y))
    assert imbalanced.state_dict() == {}


@pytest.mark.parametrize("mask_past", [False, True])
def test_logit_adjust_counts_absent_classes_as_one_image(mask_past):
    # a grown head: classes 0, 1 came earlier and have no images in this experience
    logits, y = logits_and_labels(labels=[2, 3, 3, 2, 2])
    logits.requires_grad_(True)
    strategy = LogitAdjust(tau=1.0, mask_past=mask_past)
    strategy.before_task(None, task_with([2] * 6 + [3] * 2, (2, 3)))
    loss = strategy.loss(giving(logits), None, y)
    if mask_past:  # out of the loss entirely
        expected = F.cross_entropy(logits[:, 2:] + log_prior([6, 2]), y - 2)
    else:  # counts (1, 1, 6, 2)
        expected = F.cross_entropy(logits + log_prior([1, 1, 6, 2]), y)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    old = logits.grad[:, :2]
    assert torch.equal(old, torch.zeros(5, 2)) if mask_past else (old > 0).all()  # pushed down, weakly


def test_logit_adjust_rejects_negative_tau():
    with pytest.raises(ConfigError) as info:
        LogitAdjust(tau=-0.5)
    assert info.value.path == "strategy.tau"


def test_drw_reweights_exactly_from_start_epoch():
    logits, y = logits_and_labels(labels=[0, 1, 2, 0, 0, 1, 2])
    counts = [40, 8, 2]
    strategy = DRW(beta=0.999)
    strategy.before_task(None, task_with(np.repeat([0, 1, 2], counts), (0, 1, 2)))
    weighted = F.cross_entropy(logits[:, :3], y, weight=class_balanced_weights(counts, 0.999))
    plain = F.cross_entropy(logits[:, :3], y)
    assert abs((weighted - plain).item()) > 1e-3
    losses = []
    for epoch in range(5):  # default: 5 * 4 // 5 = epoch 4 is the first weighted
        strategy.before_epoch(None, epoch, 5, 3)
        losses.append(strategy.loss(giving(logits[:, :3]), None, y))
    assert all(torch.equal(loss, plain) for loss in losses[:4])
    torch.testing.assert_close(losses[4], weighted)

    strategy.after_task(None, None, lambda: iter([]))
    assert torch.equal(strategy.loss(giving(logits[:, :3]), None, y), plain) and strategy.state_dict() == {}


def test_drw_start_epoch_default_and_explicit():
    assert [DRW().first_weighted_epoch(e) for e in (1, 2, 3, 5, 10, 200)] == [0, 1, 2, 4, 8, 160]
    assert DRW(start_epoch=2).first_weighted_epoch(10) == 2


def test_drw_through_the_engine_switches_at_start_epoch():
    seen = []

    class Spy(DRW):
        def loss(self, model, x, y, extra=None):
            seen.append((self.epoch, self.weights is not None))
            return super().loss(model, x, y, extra)

        def before_epoch(self, model, epoch, epochs, steps):
            self.epoch = epoch
            super().before_epoch(model, epoch, epochs, steps)

    exp = Experience(0, (0, 1, 2), ArrayDataset(torch.randn(14, 1, 4, 4), [0] * 10 + [1] * 3 + [2]), None)
    model = mlp((1, 4, 4), hidden=[8])
    model.grow(4)  # one more class than the data has: weight 0, no error
    strategy = Spy(start_epoch=2)
    Engine(TrainConfig(epochs=4, batch_size=7), seed=0).fit(
        model, strategy, strategy.before_task(model, Task(exp, (), 4)), experience=0, label="t")
    assert seen == [(e, e >= 2) for e in range(4) for _ in range(2)]
    assert strategy.weights.shape == (4,) and strategy.weights[3].item() == 0.0


def test_drw_weights_absent_classes_zero_and_masks_with_mask_past():
    logits, y = logits_and_labels(labels=[2, 3, 3, 2])
    strategy = DRW(start_epoch=0, beta=0.5, mask_past=True)
    strategy.before_task(None, task_with([2] * 4 + [3] * 1, (2, 3)))
    strategy.before_epoch(None, 0, 1, 1)
    # counts (0, 0, 4, 1), beta 0.5: E = 1.875, 1 -> w ∝ 8/15, 1; scaled to sum 2: 16/23, 30/23
    w = class_balanced_weights([0, 0, 4, 1], 0.5)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 16 / 23, 30 / 23]))
    torch.testing.assert_close(strategy.loss(giving(logits), None, y),
                               F.cross_entropy(logits[:, 2:], y - 2, weight=w[2:]))


@pytest.mark.parametrize("kwargs, key", [
    ({"beta": 1.0}, "strategy.beta"),
    ({"beta": -0.1}, "strategy.beta"),
    ({"start_epoch": -1}, "strategy.start_epoch"),
])
def test_drw_rejects_bad_arguments(kwargs, key):
    with pytest.raises(ConfigError) as info:
        DRW(**kwargs)
    assert info.value.path == key
