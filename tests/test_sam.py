"""SAM: the two-step update by hand, exact restore, and the engine's SAM path (train.sam_rho)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clsim.config import TrainConfig, parse_config
from clsim.data.base import ArrayDataset
from clsim.engine.checkpoint import RunState
from clsim.engine.engine import Engine
from clsim.engine.sam import SAM, frozen_batchnorm_stats
from clsim.errors import ConfigError
from clsim.experiment import train_and_evaluate
from clsim.learner import Learner
from clsim.models.small import mlp
from clsim.strategies.base import Finetune

pytestmark = pytest.mark.usefixtures("single_thread")

A = torch.tensor([1.0, 10.0])  # f(w) = 1/2 sum_i A_i w_i^2, grad f = A * w


def quadratic(w: torch.Tensor) -> torch.Tensor:
    return 0.5 * (A * w * w).sum()


def one_step(w0: list[float], *, rho: float | None, lr: float = 0.05, adaptive: bool = False) -> torch.Tensor:
    """One SGD step on the quadratic from ``w0``; with SAM when ``rho`` is not None."""
    w = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr)
    quadratic(w).backward()
    if rho is not None:
        sam = SAM(opt, rho=rho, adaptive=adaptive)
        sam.perturb()
        opt.zero_grad()
        quadratic(w).backward()  # the gradient at w + e_w
        sam.restore()
    opt.step()
    return w.detach()


def test_sam_step_on_a_quadratic_by_hand():
    # w0 = (1, 1): g = A w0 = (1, 10), ||g|| = sqrt(101); e = 0.1 * g / sqrt(101)
    # g' = A (w0 + e) = (1 + 0.1/sqrt(101), 10 * (1 + 1/sqrt(101)))
    # SAM: w1 = w0 - 0.05 g'; plain SGD: w1 = w0 - 0.05 g = (0.95, 0.5)
    s = 101 ** 0.5
    expected = torch.tensor([1 - 0.05 * (1 + 0.1 / s), 1 - 0.05 * 10 * (1 + 1 / s)])
    torch.testing.assert_close(one_step([1.0, 1.0], rho=0.1), expected)
    torch.testing.assert_close(one_step([1.0, 1.0], rho=None), torch.tensor([0.95, 0.5]))
    assert not torch.allclose(one_step([1.0, 1.0], rho=0.1), one_step([1.0, 1.0], rho=None))


def test_asam_step_on_a_quadratic_by_hand():
    # w0 = (2, 0.5): g = (2, 5); T_w g = |w| g = (4, 2.5), ||T_w g|| = sqrt(22.25)
    # e = rho * w^2 g / ||T_w g|| = 0.1 * (8, 1.25) / sqrt(22.25)
    w0, g = torch.tensor([2.0, 0.5]), torch.tensor([2.0, 5.0])
    e = 0.1 * torch.tensor([8.0, 1.25]) / 22.25 ** 0.5
    torch.testing.assert_close(one_step([2.0, 0.5], rho=0.1, adaptive=True), w0 - 0.05 * A * (w0 + e))
    assert not torch.allclose(e / e.norm(), g / g.norm())  # ASAM's direction is not SAM's


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def test_perturb_moves_by_rho_and_restore_is_bit_exact():
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    F.cross_entropy(net(x), y).backward()
    before = [p.detach().clone() for p in net.parameters()]
    grads = [p.grad.clone() for p in net.parameters()]

    sam = SAM(opt, rho=0.3)
    sam.perturb()
    moved = [p.detach() - b for p, b in zip(net.parameters(), before)]
    total = torch.sqrt(sum((m.double() ** 2).sum() for m in moved))
    assert total.item() == pytest.approx(0.3, rel=1e-4)  # one global L2 ball, radius rho
    g_norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    for m, g in zip(moved, grads):  # along the normalised gradient
        torch.testing.assert_close(m, 0.3 * g / g_norm, atol=1e-6, rtol=1e-4)
    with pytest.raises(RuntimeError):
        sam.perturb()

    sam.restore()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))  # bit for bit
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))  # grads untouched


def test_parameters_without_a_gradient_are_not_perturbed():
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(4, 5)).sum().backward()
    net[0].weight.grad = None
    frozen = net[0].weight.detach().clone()
    sam = SAM(opt, rho=1.0)
    sam.perturb()
    assert torch.equal(net[0].weight, frozen)
    sam.restore()


def sgd_run(rho: float | None, steps: int = 5) -> list[torch.Tensor]:
    """Weights after ``steps`` SGD-with-momentum steps on one batch (SAM when rho is not None)."""
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if rho is not None:
            sam = SAM(opt, rho=rho)
            sam.perturb()
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            sam.restore()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def test_rho_zero_is_plain_sgd_bit_for_bit():
    assert all(torch.equal(a, b) for a, b in zip(sgd_run(rho=0.0), sgd_run(rho=None)))
    assert not all(torch.equal(a, b) for a, b in zip(sgd_run(rho=0.05), sgd_run(rho=None)))


def test_sam_reduces_a_regression_loss():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(64, generator=gen)
    w = torch.zeros(4, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.05)
    sam = SAM(opt, rho=0.05)

    def mse() -> torch.Tensor:
        return ((x @ w - y) ** 2).mean()

    start = mse().item()
    for _ in range(50):
        opt.zero_grad()
        mse().backward()
        sam.perturb()
        opt.zero_grad()
        mse().backward()
        sam.restore()
        opt.step()
    assert mse().item() < 0.05 * start


def test_frozen_batchnorm_stats_uses_batch_stats_and_keeps_buffers():
    bn = nn.BatchNorm1d(3).train()
    bn(torch.randn(8, 3) + 2.0)
    buffers = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(8, 3)
    with frozen_batchnorm_stats(nn.Sequential(bn)):
        out = bn(x)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, buffers[key]), key  # running stats and num_batches_tracked
    torch.testing.assert_close(out, F.batch_norm(x, None, None, bn.weight, bn.bias, training=True))
    assert bn.track_running_stats
    bn(x)
    assert not torch.equal(bn.running_mean, buffers["running_mean"])  # updates again after


# --------------------------------------------------------------------------- the engine


def data(n: int = 24, seed: int = 0) -> ArrayDataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return ArrayDataset(torch.randn(n, 1, 4, 4, generator=gen) + y.view(-1, 1, 1, 1).float(), y)


def fitted(model_seed: int = 0, **train) -> nn.Module:
    torch.manual_seed(model_seed)
    model = mlp((1, 4, 4), hidden=[8])
    model.grow(3)
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, **train)
    Engine(config, seed=0).fit(model, Finetune(), data(), experience=0, label="t")
    return model


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_engine_sam_changes_the_weights_and_is_deterministic(optimizer):
    plain = fitted(optimizer=optimizer)
    sam = fitted(optimizer=optimizer, sam_rho=0.05)
    again = fitted(optimizer=optimizer, sam_rho=0.05)
    asam = fitted(optimizer=optimizer, sam_rho=0.5, sam_adaptive=True)
    pairs = list(zip(sam.state_dict().values(), plain.state_dict().values(),
                     again.state_dict().values(), asam.state_dict().values()))
    assert not all(torch.equal(s, p) for s, p, _, _ in pairs)
    assert not all(torch.equal(s, a) for s, _, _, a in pairs)
    assert all(torch.equal(s, g) for s, _, g, _ in pairs)


class Recorder(Finetune):
    """Records, at each after_backward, the weights and the gradient it sees."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def after_backward(self, model):
        self.seen.append(([p.detach().clone() for p in model.parameters()],
                          [p.grad.clone() for p in model.parameters()]))


def test_engine_sam_step_hooks_once_on_the_perturbed_gradient_at_restored_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    plain_model = copy.deepcopy(model)
    x, y = data(8).get_batch(torch.arange(8))
    engine = Engine(TrainConfig(optimizer="sgd", momentum=0.0, lr=0.1, sam_rho=0.2), seed=0)
    strategy = Recorder()
    before = [p.detach().clone() for p in model.parameters()]
    loss = engine.step(model, strategy, engine._optimizer(model), x, y)

    assert len(strategy.seen) == 1  # once per step, not once per backward pass
    weights, grads = strategy.seen[0]
    assert all(torch.equal(w, b) for w, b in zip(weights, before))  # restored before the hook
    # the loss reported is the one at w (the first pass), which also updated BN's statistics
    assert loss == pytest.approx(F.cross_entropy(plain_model(x), y).item(), rel=1e-6)
    bn, plain_bn = model[2], plain_model[2]
    assert torch.equal(bn.running_mean, plain_bn.running_mean)
    assert torch.equal(bn.running_var, plain_bn.running_var)
    # the hook saw g' = the gradient at w + e_w, e_w = rho g / ||g||, and the update applied it
    probe = copy.deepcopy(plain_model)
    with frozen_batchnorm_stats(probe):
        F.cross_entropy(probe(x), y).backward()
        g = [p.grad for p in probe.parameters()]
        norm = torch.sqrt(sum((t ** 2).sum() for t in g))
        with torch.no_grad():
            for p, t in zip(probe.parameters(), g):
                p.add_(0.2 * t / norm)
        probe.zero_grad()
        F.cross_entropy(probe(x), y).backward()
    for got, want in zip(grads, (p.grad for p in probe.parameters())):
        torch.testing.assert_close(got, want)
    for p, b, gr in zip(model.parameters(), before, grads):  # plain SGD: w1 = w0 - lr * g'
        torch.testing.assert_close(p.detach(), b - 0.1 * gr)
    assert int(bn.num_batches_tracked) == 1


def test_engine_sam_resume_is_exact(tiny_scenario, tiny_mlp):
    """Stopping after experience 0 and resuming with SAM gives the uninterrupted run's weights."""

    def learner(model_seed: int) -> Learner:
        engine = Engine(TrainConfig(epochs=1, batch_size=8, lr=1e-2, sam_rho=0.05), seed=0)
        model = tiny_mlp(tiny_scenario.input_shape, seed=model_seed)
        strategy = Finetune()
        strategy.setup(model)
        return Learner(tiny_scenario, model, strategy, engine)

    a, state_a = learner(0), RunState()
    train_and_evaluate(a, 0, state_a)
    buffer = io.BytesIO()
    torch.save({"model": a.model.state_dict(), "num_classes": a.model.num_classes, "run": state_a}, buffer)
    buffer.seek(0)
    payload = torch.load(buffer, weights_only=False)
    b = learner(99)
    b.model.grow(payload["num_classes"])
    b.model.load_state_dict(payload["model"])
    state_b = payload["run"]
    train_and_evaluate(a, 1, state_a)
    train_and_evaluate(b, 1, state_b)
    for (key, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(wa, wb), key
    assert state_a.rows == state_b.rows and state_a.losses == state_b.losses


# --------------------------------------------------------------------------- config


def test_sam_rho_range_is_checked():
    with pytest.raises(ConfigError) as info:
        TrainConfig(sam_rho=-0.1)
    assert info.value.path == "train.sam_rho"
    raw = {"data": "digits", "scenario": "class_incremental", "model": "mlp", "strategy": "finetune",
           "train": {"sam_rho": -1}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.path == "train.sam_rho"
    config = parse_config(raw | {"train": {"sam_rho": 0.05, "sam_adaptive": True}})
    assert config.train.sam_rho == 0.05 and config.train.sam_adaptive
    assert parse_config(config.to_dict()) == config  # config.yaml records both
    assert TrainConfig().sam_rho == 0.0  # off by default
