"""Shared fixtures: a tiny hand-built Source, a 2-experience scenario, a tiny learner."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

import pytest
import torch

from clsim.data.base import ArrayDataset, Source
from clsim.registry import MODELS
from clsim.scenarios.base import Scenario
from clsim.scenarios.builders import class_incremental
from clsim.strategies.base import Strategy

if TYPE_CHECKING:
    from clsim.learner import Learner

TINY_SHAPE = (1, 4, 4)


def _make_source(
    train_counts: Sequence[int], test_counts: Sequence[int] | int = 4, *,
    shape: tuple[int, int, int] = TINY_SHAPE, seed: int = 0,
) -> Source:
    """A Source with ``train_counts[c]`` / ``test_counts[c]`` images of class c.

    Items are shuffled, so a class's indices are not contiguous; each class is a Gaussian
    blob around its own random mean, so a small model can learn it in a few steps.
    """
    gen = torch.Generator().manual_seed(seed)
    C = len(train_counts)
    test_counts = [test_counts] * C if isinstance(test_counts, int) else list(test_counts)
    means = 2.0 * torch.randn(C, *shape, generator=gen)

    def split(counts: Sequence[int]) -> ArrayDataset:
        labels = np.repeat(np.arange(C), counts)
        labels = labels[torch.randperm(len(labels), generator=gen).numpy()]
        noise = torch.randn(len(labels), *shape, generator=gen)
        return ArrayDataset(means[torch.from_numpy(labels)] + 0.5 * noise, labels)

    return Source(name="tiny", train=split(train_counts), test=split(test_counts),
                  class_names=tuple(f"c{c}" for c in range(C)), input_shape=shape)


@pytest.fixture
def source() -> Source:
    """6 classes, 10 train and 4 test images each, (1, 4, 4) images."""
    return _make_source([10] * 6)


@pytest.fixture
def tiny_scenario() -> Scenario:
    """2 experiences x 2 classes (random order), 16 train / 4 test images per class."""
    return class_incremental(_make_source([16] * 4), 0, n_tasks=2)


def _tiny_mlp(input_shape: tuple[int, int, int] = TINY_SHAPE, *, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS.get("mlp")(input_shape, hidden=[16])


def _make_learner(
    scenario: Scenario, strategy: Strategy, *, seed: int = 0, model_seed: int | None = None,
    lr: float = 1e-2, epochs: int = 1,
) -> Learner:
    """A learner as ``Learner.build`` makes one: tiny MLP, ``epochs`` epochs (default 1), CPU.

    ``seed`` is the experiment seed (the engine's batches); ``model_seed`` (default ``seed``)
    draws the initial weights.
    """
    from clsim.config import TrainConfig  # here: a broken engine fails only the tests that train
    from clsim.engine.engine import Engine
    from clsim.learner import Learner

    engine = Engine(TrainConfig(epochs=epochs, batch_size=8, lr=lr, eval_batch_size=64), seed=seed)
    model_seed = seed if model_seed is None else model_seed
    required = getattr(strategy, "required_model", None)  # e.g. gcab_vit, or (deit, dhvt_distilled)
    if isinstance(required, tuple):
        required = required[0]
    if required is None:
        model = _tiny_mlp(scenario.input_shape, seed=model_seed)
    else:
        torch.manual_seed(model_seed)
        model = MODELS.get(required)(scenario.input_shape, embed_dim=16, depth=1, num_heads=2)
    strategy.setup(model)
    teacher = _TinyTeacher(scenario) if getattr(strategy, "uses_teacher", False) else None
    return Learner(scenario, model, strategy, engine, teacher=teacher)


class _TinyTeacher:
    """A stand-in for :class:`clsim.teacher.Teacher`: a fixed tiny MLP per experience."""

    def __init__(self, scenario: Scenario):
        self.scenario = scenario

    def for_experience(self, index: int) -> torch.nn.Module:
        from clsim.teacher import freeze

        model = _tiny_mlp(self.scenario.input_shape, seed=1234)
        model.grow(self.scenario.seen_classes(index))
        return freeze(model)


@pytest.fixture
def make_source():
    """The factory behind ``source``: ``make_source(train_counts, test_counts=4, *, shape, seed)``."""
    return _make_source


@pytest.fixture
def tiny_mlp():
    """``tiny_mlp(input_shape=(1, 4, 4), *, seed=0)``: the registered MLP, one hidden layer of 16."""
    return _tiny_mlp


@pytest.fixture
def make_learner():
    """``make_learner(scenario, strategy, *, seed=0, model_seed=None, lr=1e-2, epochs=1)``: see ``_make_learner``."""
    return _make_learner


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-tensor tests (and the previous count restored).

    On a small, busy machine torch's thread pool costs more than it gains for (B=2..16)
    batches: one thread made the model tests several times faster.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:  # read once at import: patch the values too (offline, and an empty weights cache)
        from huggingface_hub import constants
    except ImportError:
        return
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


class Stopped(Exception):
    """Raised by :func:`stop_before_experience` in place of training that experience."""


@pytest.fixture
def stop_before_experience(monkeypatch):
    """``stop_before_experience(k)``: until undone (call the returned function), a local run raises
    :class:`Stopped` instead of training experience ``k``, after the checkpoint of ``k - 1``."""
    from clsim import experiment

    original = experiment.train_and_evaluate

    def arm(k: int):
        def stopping(learner, index, state):
            if index == k:
                raise Stopped
            original(learner, index, state)

        monkeypatch.setattr(experiment, "train_and_evaluate", stopping)
        return lambda: monkeypatch.setattr(experiment, "train_and_evaluate", original)

    return arm
