"""Strategies: every registered one through the real loop, resume exactness, and each method's math."""

from __future__ import annotations

import copy
import inspect
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clsim.data.base import ArrayDataset
from clsim.engine.checkpoint import RunState
from clsim.errors import ConfigError
from clsim.experiment import train_and_evaluate
from clsim.models.heads import IncrementalClassifier
from clsim.models.timm_models import vit
from clsim.registry import STRATEGIES
from clsim.scenarios.base import Experience
from clsim.strategies.base import Task, split_prediction
from clsim.strategies.ewc import EWC
from clsim.strategies.feature_distill import FeatureDistill
from clsim.strategies.joint import Joint
from clsim.strategies.l2 import L2
from clsim.strategies.lwf import LwF
from clsim.strategies.params import select_parameters

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = STRATEGIES.names()


def takes(name: str, param: str) -> bool:
    return param in inspect.signature(STRATEGIES.get(name)).parameters


WITH_LAMBDA = [n for n in NAMES if takes(n, "lambda_")]
WITH_MASK_PAST = [n for n in NAMES if takes(n, "mask_past") and STRATEGIES.get(n).required_model is None]
WITH_PARAMS = [n for n in NAMES if takes(n, "params")]


def run_stream(learner, upto: int | None = None, state: RunState | None = None) -> RunState:
    """``experiment.run``'s loop over the experiences (without the run folder)."""
    state = state or RunState()
    for index in range(state.next_experience, len(learner.scenario) if upto is None else upto):
        train_and_evaluate(learner, index, state)
    return state


def through_checkpoint(obj):
    """``obj`` after a save/load round trip, as a checkpoint stores it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def experience(index: int, classes: tuple[int, ...]) -> Experience:
    """An experience for the hooks that only read its classes."""
    return Experience(index, classes, None, None)


def task(index: int, classes: tuple[int, ...]) -> Task:
    """The :class:`Task` of :func:`experience` (for ``after_task``, which reads only its classes)."""
    return Task(experience(index, classes), seen_classes=max(classes) + 1)


def linear_model(in_features: int = 4, num_classes: int = 3, *, seed: int = 0) -> IncrementalClassifier:
    """One linear layer: logits = x W^T + b (the backbone only flattens)."""
    torch.manual_seed(seed)
    model = IncrementalClassifier(nn.Flatten(), in_features)
    model.grow(num_classes)
    return model


def batch_of(scenario, index: int, n: int = 8, split: str = "train"):
    return getattr(scenario.experiences[index], split).get_batch(torch.arange(n))


def training_loss(strategy, model, x, y) -> torch.Tensor:
    """The training loss of a clean batch (no ``prepare_batch``, so no ``extra``)."""
    return strategy.loss(model, x, y, None)


def predicted(strategy, model, x) -> torch.Tensor:
    """``predict``'s main logits (a strategy may also return named variants)."""
    return split_prediction(strategy.predict(model, x))[0]


def same_prediction(a, b, model, x) -> bool:
    """The two strategies' predictions (logits and every variant) are bit-identical."""
    (la, va), (lb, vb) = split_prediction(a.predict(model, x)), split_prediction(b.predict(model, x))
    return torch.equal(la, lb) and va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)


# --------------------------------------------------------------------------- every strategy


@pytest.mark.parametrize("name", NAMES)
def test_strategy_trains_a_two_experience_stream(name, tiny_scenario, make_learner):
    strategy = STRATEGIES.get(name)()  # the defaults are a valid configuration
    # 10 epochs of 4 steps: GCAB anneals its gates within each epoch and DeiT-LT's teacher-strategy
    # trains through strong augmentation; at 1 epoch they stay at chance on this data
    learner = make_learner(tiny_scenario, strategy, epochs=10)
    initial = copy.deepcopy(learner.model.backbone.state_dict())
    state = run_stream(learner)

    assert len(state.losses) == 2 and all(math.isfinite(loss) for loss in state.losses)
    assert state.rows[0][0] is not None and state.rows[0][1] is None  # row 0: only task 0 tested
    assert all(0.0 <= a <= 1.0 for a in state.rows[1])
    # the data is separable: the task just trained is learnt well above chance (1/4)
    if not strategy.freezes_backbone:  # a frozen random tiny backbone's features carry ~no signal
        assert state.rows[1][1] >= 0.5
        moved = [k for k, v in learner.model.backbone.state_dict().items() if not torch.equal(v, initial[k])]
        assert moved, "training left the backbone unchanged"

    x, _ = batch_of(tiny_scenario, 0, 5, "test")
    learner.model.eval()
    with torch.no_grad():
        logits = predicted(strategy, learner.model, x)
    assert logits.shape == (5, tiny_scenario.num_classes)  # every class seen so far, no task id
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_a_checkpoint_is_exact(name, tiny_scenario, make_learner):
    """Stopping after experience 0 and resuming gives bit-identical weights and results."""
    a = make_learner(tiny_scenario, STRATEGIES.get(name)())
    state_a = run_stream(a, upto=1)
    payload = through_checkpoint({"num_classes": a.model.num_classes, "model": a.model.state_dict(),
                                  "strategy": a.strategy.state_dict(), "run": state_a})
    # as experiment.restore does: a fresh learner (other initial weights), then the checkpoint
    b = make_learner(tiny_scenario, STRATEGIES.get(name)(), model_seed=99)
    b.model.grow(payload["num_classes"])
    b.model.load_state_dict(payload["model"])
    b.strategy.load_state_dict(payload["strategy"])
    state_b = payload["run"]

    # the global generators differ here (b drew other initial weights): train_and_evaluate
    # must seed whatever it draws (the new head rows, dropout) from the experiment seed
    run_stream(a, state=state_a)
    run_stream(b, state=state_b)
    for (key, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(wa, wb), key
    assert state_a.rows == state_b.rows and state_a.losses == state_b.losses


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_gives_identical_predictions_and_loss(name, tiny_scenario, make_learner):
    strategy = STRATEGIES.get(name)()
    learner = make_learner(tiny_scenario, strategy)
    run_stream(learner)
    model, last = learner.model, tiny_scenario.experiences[-1]
    past = tiny_scenario.experiences[:-1]
    with torch.no_grad():  # move away from the last anchor / teacher so penalties are not 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    x, y = batch_of(tiny_scenario, 1)

    state = strategy.state_dict()
    fresh = STRATEGIES.get(name)()
    fresh.setup(model)
    fresh.load_state_dict(through_checkpoint(state))
    # both then start the same task (its teacher, if any, arrives in it); before_task sets no
    # trained state, so whatever differs below comes from the state
    next_task = learner.task(last, past)
    for s in (strategy, fresh):
        s.before_task(model, next_task)
    with torch.no_grad():
        assert same_prediction(fresh, strategy, model, x)
        loss = training_loss(strategy, model, x, y)
        assert torch.equal(training_loss(fresh, model, x, y), loss)
        if any(holds_something(v) for v in state.values()):
            # the state matters: without it the loss or the predictions differ, so the
            # equalities above are a test
            blank = STRATEGIES.get(name)()
            blank.setup(model)
            blank.before_task(model, next_task)
            assert not (torch.equal(training_loss(blank, model, x, y), loss)
                        and same_prediction(blank, strategy, model, x))


def holds_something(value) -> bool:
    if value is None:
        return False
    try:
        return len(value) > 0
    except TypeError:  # a number or a 0-d tensor
        return True


@pytest.mark.parametrize("name", WITH_LAMBDA)
def test_negative_lambda_is_a_config_error(name):
    with pytest.raises(ConfigError) as info:
        STRATEGIES.get(name)(lambda_=-1.0)
    assert info.value.path == "strategy.lambda"


@pytest.mark.parametrize("cls, kwargs, key", [
    (EWC, {"decay": 1.5}, "strategy.decay"),
    (EWC, {"decay": -0.1}, "strategy.decay"),
    (LwF, {"temperature": 0.0}, "strategy.temperature"),
])
def test_other_bad_arguments_are_config_errors(cls, kwargs, key):
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert info.value.path == key


# --------------------------------------------------------------------------- mask_past


def balanced_task(index: int, classes: tuple[int, ...], num_classes: int = 4) -> Task:
    """A task whose training set holds every class equally often: a class prior (logit
    adjustment, re-weighting) is then uniform and leaves the cross-entropy as it is."""
    data = ArrayDataset(torch.zeros(2 * num_classes, 1, 4, 4), list(range(num_classes)) * 2)
    return Task(Experience(index, classes, data, None), seen_classes=num_classes)


@pytest.mark.parametrize("name", WITH_MASK_PAST)
def test_mask_past_masks_earlier_classes_in_the_loss(name, tiny_mlp):
    model = tiny_mlp()
    model.grow(4)
    strategy = STRATEGIES.get(name)(mask_past=True)
    strategy.setup(model)
    x, y = torch.randn(5, 1, 4, 4), torch.tensor([2, 3, 3, 2, 3])

    strategy.before_task(model, balanced_task(0, (0, 1)))  # nothing earlier: nothing masked
    logits = torch.randn(5, 4)
    assert torch.equal(strategy.training_logits(logits), logits)

    strategy.before_task(model, balanced_task(1, (2, 3)))
    logits = torch.randn(5, 4, requires_grad=True)
    masked = strategy.training_logits(logits)
    assert torch.isneginf(masked[:, :2]).all() and torch.equal(masked[:, 2:], logits[:, 2:])
    model.zero_grad()
    loss = strategy.loss(model, x, y)  # the forward pass is the hook's
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(loss, F.cross_entropy(out[:, 2:], y - 2))  # CE over new classes only
    loss.backward()
    # the old classes' logits are not pushed down: no gradient reaches their head rows
    assert torch.equal(model.head.weight.grad[:2], torch.zeros_like(model.head.weight[:2]))
    assert torch.equal(model.head.bias.grad[:2], torch.zeros(2))
    assert not torch.equal(model.head.weight.grad[2:], torch.zeros_like(model.head.weight[2:]))

    plain = STRATEGIES.get(name)(mask_past=False)
    plain.setup(model)
    plain.before_task(model, balanced_task(1, (2, 3)))
    torch.testing.assert_close(plain.loss(model, x, y), F.cross_entropy(out, y))


@pytest.mark.parametrize("mask_past", [True, False])
@pytest.mark.parametrize("name", WITH_MASK_PAST)
def test_mask_past_leaves_old_head_rows_untouched_in_training(name, mask_past, tiny_scenario, make_learner):
    learner = make_learner(tiny_scenario, STRATEGIES.get(name)(mask_past=mask_past))
    state = run_stream(learner, upto=1)
    old_rows = learner.model.head.weight.detach().clone()  # (2, D): task 0's classes
    run_stream(learner, state=state)
    # masked: no gradient reaches them (nor any penalty, at their anchor); unmasked: pushed down
    assert torch.equal(learner.model.head.weight[:2], old_rows) == mask_past


# --------------------------------------------------------------------------- parameter selection


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    model = vit((3, 8, 8), embed_dim=16, depth=2, num_heads=2)
    model.grow(3)
    return model


@pytest.mark.parametrize("name", WITH_PARAMS)
def test_params_attention_selects_exactly_the_attention_blocks(name, tiny_vit):
    strategy = STRATEGIES.get(name)(params="attention")
    strategy.setup(tiny_vit)
    expected = {f"backbone.blocks.{i}.attn.{layer}.{kind}"
                for i in range(2) for layer in ("qkv", "proj") for kind in ("weight", "bias")}
    assert expected <= {n for n, _ in tiny_vit.named_parameters()}
    assert set(strategy.names) == expected
    strategy.after_task(tiny_vit, task(0, (0, 1, 2)), lambda: iter([]))
    assert all(set(anchor) == expected for anchor, _ in strategy.anchors)


def test_params_presets_and_globs(tiny_vit):
    all_names = [n for n, _ in tiny_vit.named_parameters()]
    assert select_parameters(tiny_vit, "all") == all_names
    backbone = select_parameters(tiny_vit, "backbone")
    assert backbone == [n for n in all_names if not n.startswith("head.")]
    assert select_parameters(tiny_vit, ["head.*"]) == ["head.weight", "head.bias"]
    assert select_parameters(tiny_vit, ["backbone.blocks.1.attn.qkv.*"]) == [
        "backbone.blocks.1.attn.qkv.weight", "backbone.blocks.1.attn.qkv.bias"]


@pytest.mark.parametrize("spec", ["attention", ["nothing.*"]])
@pytest.mark.parametrize("name", WITH_PARAMS)
def test_params_matching_nothing_is_a_config_error(name, spec, tiny_mlp):
    strategy = STRATEGIES.get(name)(params=spec)
    with pytest.raises(ConfigError) as info:
        strategy.setup(tiny_mlp())  # an MLP has no attention
    assert info.value.path == "strategy.params"


# --------------------------------------------------------------------------- L2


def test_l2_penalty_by_hand(tiny_mlp):
    model = tiny_mlp()
    model.grow(2)
    strategy = L2(lambda_=0.3)
    strategy.setup(model)
    strategy.after_task(model, task(0, (0, 1)), lambda: iter([]))
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 0, 1, 1, 0])
    assert training_loss(strategy, model, x, y).item() == pytest.approx(F.cross_entropy(model(x), y).item())

    with torch.no_grad():
        model.backbone[1].weight[3, 5] += 0.5
        model.head.bias[1] -= 0.25
    model.grow(4)  # the new rows have no anchor: they add nothing
    # lambda/2 * ||theta - theta*||^2 = 0.3 / 2 * (0.5^2 + 0.25^2) = 0.15 * 0.3125 = 0.046875
    assert strategy.penalty(model).item() == pytest.approx(0.3125)
    ce = F.cross_entropy(model(x), y)
    assert (training_loss(strategy, model, x, y) - ce).item() == pytest.approx(0.046875, rel=1e-5)

    strategy.after_task(model, task(1, (2, 3)), lambda: iter([]))  # re-anchored here
    assert len(strategy.anchors) == 1 and strategy.penalty(model).item() == 0.0


def test_l2_backbone_params_ignore_the_head(tiny_mlp):
    model = tiny_mlp()
    model.grow(2)
    strategy = L2(params="backbone")
    strategy.setup(model)
    strategy.after_task(model, task(0, (0, 1)), lambda: iter([]))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert strategy.penalty(model).item() == 0.0
    with torch.no_grad():
        model.backbone[1].bias[0] += 2.0
    assert strategy.penalty(model).item() == pytest.approx(4.0)


# --------------------------------------------------------------------------- EWC


def batches_for(in_features: int, num_classes: int, sizes=(4, 4, 2), *, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, in_features, generator=gen), torch.randint(0, num_classes, (n,), generator=gen))
            for n in sizes]


def fisher_by_hand(model: IncrementalClassifier, batches) -> dict[str, torch.Tensor]:
    """Mean over batches of the squared gradient of the batch-mean CE, for logits = x W^T + b.

    d CE / d logits = (softmax(logits) - onehot(y)) / B = G (B, C); dW = G^T x, db = sum_i G_i.
    """
    W, b = model.head.weight.detach(), model.head.bias.detach()
    fw, fb = torch.zeros_like(W), torch.zeros_like(b)
    for x, y in batches:
        G = (torch.softmax(x @ W.T + b, dim=1) - F.one_hot(y, W.shape[0]).float()) / len(y)
        fw += (G.T @ x) ** 2
        fb += G.sum(0) ** 2
    return {"head.weight": fw / len(batches), "head.bias": fb / len(batches)}


def test_ewc_fisher_is_the_mean_squared_batch_gradient():
    model = linear_model(4, 3)
    model.train()
    strategy = EWC(lambda_=2.0, fisher="batch_mean")  # the estimator computed by hand below
    strategy.setup(model)
    batches = batches_for(4, 3)
    fisher = strategy.fisher(model, lambda: iter(batches))
    expected = fisher_by_hand(model, batches)
    assert set(fisher) == set(expected)
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name])
    assert all(p.grad is None for p in model.parameters()) and model.training  # left as found

    strategy.after_task(model, task(0, (0, 1, 2)), lambda: iter(batches))
    anchor, importance = strategy.anchors[0]
    with torch.no_grad():
        delta = 0.1 * torch.randn_like(model.head.weight)
        model.head.weight.add_(delta)
    # penalty = sum F (theta - theta*)^2; the loss adds lambda/2 of it
    by_hand = (expected["head.weight"] * delta**2).sum()
    torch.testing.assert_close(strategy.penalty(model), by_hand)
    x, y = batches[0]
    extra = training_loss(strategy, model, x, y) - F.cross_entropy(model(x), y)
    torch.testing.assert_close(extra, 0.5 * 2.0 * by_hand)


def two_tasks(strategy: EWC):
    """Task 0 with 2 classes, then a moved model grown to 3 classes for task 1."""
    model = linear_model(4, 2)
    strategy.setup(model)
    b0, b1 = batches_for(4, 2, seed=1), batches_for(4, 3, seed=2)
    f0 = fisher_by_hand(model, b0)
    theta0 = model.head.weight.detach().clone()
    strategy.after_task(model, task(0, (0, 1)), lambda: iter(b0))
    with torch.no_grad():
        model.head.weight.add_(0.2)
    model.grow(3)
    f1 = fisher_by_hand(model, b1)
    theta1 = model.head.weight.detach().clone()
    strategy.after_task(model, task(1, (2,)), lambda: iter(b1))
    return model, (theta0, f0), (theta1, f1)


def test_ewc_separate_keeps_one_anchor_per_task():
    strategy = EWC(mode="separate", fisher="batch_mean")
    model, (theta0, f0), (theta1, f1) = two_tasks(strategy)
    assert len(strategy.anchors) == 2
    for (anchor, importance), theta, f in zip(strategy.anchors, (theta0, theta1), (f0, f1)):
        assert torch.equal(anchor["head.weight"], theta)
        torch.testing.assert_close(importance["head.weight"], f["head.weight"])
    # at theta1 only the task-0 anchor pulls: sum F0 (theta1[:2] - theta0)^2, with theta1 - theta0 = 0.2
    torch.testing.assert_close(strategy.penalty(model), (f0["head.weight"] * 0.04).sum())


def test_ewc_online_keeps_one_decayed_fisher():
    strategy = EWC(mode="online", decay=0.5, fisher="batch_mean")
    model, _, (theta1, f1) = two_tasks(strategy)
    f0 = two_tasks(EWC(mode="separate", fisher="batch_mean"))[1][1]
    assert len(strategy.anchors) == 1
    anchor, importance = strategy.anchors[0]
    assert torch.equal(anchor["head.weight"], theta1)  # anchored at the latest weights
    # F = decay * F_old + F_new; the grown row 2 had no old Fisher (zero)
    expected = f1["head.weight"].clone()
    expected[:2] += 0.5 * f0["head.weight"]
    torch.testing.assert_close(importance["head.weight"], expected)
    torch.testing.assert_close(importance["head.bias"][2], f1["head.bias"][2])
    assert strategy.penalty(model).item() == 0.0


# --------------------------------------------------------------------------- distillation


def test_lwf_distillation_is_zero_at_the_teacher_and_positive_after(tiny_mlp):
    model = tiny_mlp()
    model.grow(2)
    strategy = LwF(lambda_=0.7, temperature=2.0)
    strategy.setup(model)
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([2, 3, 2, 3, 2, 3])
    assert strategy.teacher is None
    y0 = y - 2  # task 0's labels
    assert training_loss(strategy, model, x, y0).item() == pytest.approx(
        F.cross_entropy(model(x), y0).item())

    strategy.after_task(model, task(0, (0, 1)), lambda: iter([]))
    teacher = copy.deepcopy(strategy.teacher.state_dict())
    assert not any(p.requires_grad for p in strategy.teacher.parameters())
    model.grow(4)
    out = model(x)
    extra = training_loss(strategy, model, x, y) - F.cross_entropy(out, y)
    assert abs(extra.item()) < 1e-6

    with torch.no_grad():
        old = strategy.teacher(x)  # (B, 2)
        model.backbone[1].weight.add_(0.3 * torch.randn_like(model.backbone[1].weight))
    out = model(x)
    T = 2.0
    p = torch.softmax(old / T, dim=1)  # KL(p_teacher || p_student) over the 2 old classes
    kl = (p * (p.log() - torch.log_softmax(out[:, :2] / T, dim=1))).sum(1).mean()
    extra = training_loss(strategy, model, x, y) - F.cross_entropy(out, y)
    assert kl.item() > 1e-4
    torch.testing.assert_close(extra, 0.7 * T * T * kl)
    for key, value in strategy.teacher.state_dict().items():  # the teacher did not move
        assert torch.equal(value, teacher[key])


def test_feature_distill_is_zero_at_the_snapshot(tiny_mlp):
    model = tiny_mlp()
    model.grow(2)
    strategy = FeatureDistill(lambda_=3.0)
    strategy.setup(model)
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([2, 3, 2, 3, 2, 3])
    strategy.after_task(model, task(0, (0, 1)), lambda: iter([]))
    model.grow(4)
    logits, features = model.logits_and_features(x)  # what the loss hook's forward pass uses
    torch.testing.assert_close(logits, model(x))
    assert features.shape == (6, model.feature_dim)
    extra = training_loss(strategy, model, x, y) - F.cross_entropy(model(x), y)
    assert abs(extra.item()) < 1e-6

    with torch.no_grad():
        old = model.features(x)
        model.backbone[1].weight.add_(0.3)
    extra = training_loss(strategy, model, x, y) - F.cross_entropy(model(x), y)
    by_hand = 3.0 * ((model.features(x) - old) ** 2).mean()
    assert by_hand.item() > 1e-4
    torch.testing.assert_close(extra, by_hand)


# --------------------------------------------------------------------------- joint


def test_joint_trains_on_the_union_of_experiences_so_far(make_source):
    from clsim.scenarios.builders import class_incremental

    scenario = class_incremental(make_source([3, 4, 5, 6, 7, 8]), 0, n_tasks=3)
    e0, e1, e2 = scenario.experiences
    strategy = Joint()
    assert len(strategy.before_task(None, Task(e0, (), 2))) == len(e0.train)
    union = strategy.before_task(None, Task(e2, (e0, e1), 6))
    assert len(union) == len(e0.train) + len(e1.train) + len(e2.train)
    np.testing.assert_array_equal(union.targets, np.concatenate([e.train.targets for e in (e0, e1, e2)]))
    x, y = union.get_batch(torch.arange(len(union)))
    assert sorted(np.unique(y.numpy()).tolist()) == list(range(6))
    np.testing.assert_array_equal(y.numpy(), union.targets)
    x1, y1 = e1.train.get_batch(torch.tensor([0]))
    assert torch.equal(x[len(e0.train)], x1[0]) and int(y[len(e0.train)]) == int(y1[0])


def test_before_epoch_is_called_once_per_epoch_with_the_step_count():
    """The engine tells strategies where training stands (DRW, gate annealing need it)."""
    from clsim.config import TrainConfig
    from clsim.data.base import ArrayDataset
    from clsim.engine.engine import Engine
    from clsim.models.small import mlp
    from clsim.strategies.base import Finetune

    calls = []

    class Recorder(Finetune):
        def before_epoch(self, model, epoch, epochs, steps):
            calls.append((epoch, epochs, steps))

    data = ArrayDataset(torch.randn(10, 1, 4, 4), [0, 1] * 5)
    model = mlp((1, 4, 4), hidden=[8])
    model.grow(2)
    Engine(TrainConfig(epochs=3, batch_size=4), seed=0).fit(model, Recorder(), data, experience=0, label="t")
    assert calls == [(0, 3, 3), (1, 3, 3), (2, 3, 3)]  # 10 items in batches of 4: 3 steps


def test_folded_penalty_has_exactly_zero_gradient_where_all_anchors_agree():
    # Three anchors with awkward importances that agree on column 0: at the anchor value the
    # folded quadratic must pull with exactly 0 there (Adam turns any residue into a full step).
    from clsim.strategies.anchored import fold

    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(5, 1, generator=gen) * 3
    anchors = []
    for _ in range(3):
        a = torch.cat([shared, torch.randn(5, 2, generator=gen)], dim=1)
        anchors.append(({"w": a}, {"w": torch.rand(5, 3, generator=gen) * 1e3 + 1e-4}))
    (W, center), = fold(tuple(anchors))[0].values()
    x = anchors[-1][0]["w"].clone().requires_grad_(True)
    (W * (x - center).pow(2)).sum().backward()
    assert torch.equal(x.grad[:, 0], torch.zeros(5))
    assert (x.grad[:, 1:] != 0).all()
