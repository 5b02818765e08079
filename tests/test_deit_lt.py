"""DeiT-LT: the loss by hand, OOD vs in-distribution teacher inputs, DRW, the teacher run, resume."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import clsim.experiment
from clsim import metrics as M
from clsim.cli import main as cli_main
from clsim.config import TrainConfig, parse_config
from clsim.data.strong_augment import BatchMixup, StrongAugment, seed_global_generators
from clsim.engine.engine import Engine
from clsim.errors import ConfigError
from clsim.losses import class_balanced_weights
from clsim.models.cifar_resnet import resnet_cifar
from clsim.models.deit import deit
from clsim.scenarios.base import Experience
from clsim.strategies.base import Task
from clsim.strategies.deit_lt import DeiTLT

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (3, 8, 8)
C = 4


def student(seed: int = 0):
    torch.manual_seed(seed)
    model = deit(SHAPE, embed_dim=16, depth=1, num_heads=2, patch_size=2)
    model.grow(C)
    return model


class Recording(torch.nn.Module):
    """A fixed linear teacher that remembers what it was shown."""

    def __init__(self, seed: int = 3):
        super().__init__()
        self.linear = torch.nn.Linear(int(np.prod(SHAPE)), C)
        torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(seed))
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x)
        return self.linear(x.flatten(1))


def batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, C, (n,), generator=g)


def experience(counts=(40, 20, 8, 2)) -> Experience:
    """An experience whose training targets have ``counts`` images per class (no images needed)."""
    targets = np.repeat(np.arange(C), counts)

    class Targets:
        def __init__(self):
            self.targets = targets

    return Experience(0, list(range(C)), Targets(), None)


def task(teacher=None, counts=(40, 20, 8, 2)) -> Task:
    """The task of :func:`experience`, with the teacher a run gives in it."""
    return Task(experience(counts), (), C, teacher)


# --------------------------------------------------------------------------- the loss


def test_hard_distillation_loss_by_hand():
    model, teacher = student(), Recording()
    strategy = DeiTLT(augment=False)
    strategy.setup(model)
    strategy.before_task(model, task(teacher))
    x, y = batch()
    x, y, extra = strategy.prepare_batch(x, y)
    loss = strategy.loss(model, x, y, extra)
    cls_logits, dist_logits = model.forward_both(x)
    target = teacher.linear(x.flatten(1)).argmax(dim=1)
    expected = 0.5 * F.cross_entropy(cls_logits, y) + 0.5 * F.cross_entropy(dist_logits, target)
    torch.testing.assert_close(loss, expected)
    assert not torch.equal(target, y)  # the DIST head follows the teacher, not the labels


def test_soft_distillation_is_the_tau_squared_kl():
    model, teacher = student(), Recording()
    strategy = DeiTLT(augment=False, distillation="soft", temperature=2.0, alpha=0.3)
    strategy.setup(model)
    strategy.before_task(model, task(teacher))
    x, y = batch()
    x, y, extra = strategy.prepare_batch(x, y)
    loss = strategy.loss(model, x, y, extra)
    cls_logits, dist_logits = model.forward_both(x)
    p_t = F.softmax(teacher.linear(x.flatten(1)) / 2, dim=1)
    # the reference code's scaling: sum of the KL over batch and classes / (B x C), times tau^2
    kl = (p_t * (p_t.log() - F.log_softmax(dist_logits / 2, dim=1))).sum(1).mean() * 4 / C
    torch.testing.assert_close(loss, 0.7 * F.cross_entropy(cls_logits, y) + 0.3 * kl)


def test_drw_weights_the_distillation_by_the_teachers_class_from_drw_epoch():
    model, teacher = student(), Recording()
    strategy = DeiTLT(augment=False, drw_epoch=2)
    strategy.setup(model)
    strategy.before_task(model, task(teacher))  # counts the task's training labels
    x, y = batch()
    strategy.before_epoch(model, 1, 3, 1)
    assert strategy.weights is None
    strategy.before_epoch(model, 2, 3, 1)
    w = class_balanced_weights([40, 20, 8, 2], 0.9999)
    torch.testing.assert_close(strategy.weights, w)
    x, y, extra = strategy.prepare_batch(x, y)
    loss = strategy.loss(model, x, y, extra)
    cls_logits, dist_logits = model.forward_both(x)
    target = teacher.linear(x.flatten(1)).argmax(dim=1)
    expected = 0.5 * F.cross_entropy(cls_logits, y) + 0.5 * F.cross_entropy(dist_logits, target, weight=w)
    torch.testing.assert_close(loss, expected)  # CLS stays unweighted


def test_default_drw_epoch_is_four_fifths_and_drw_off_never_reweights():
    strategy = DeiTLT(augment=False)
    strategy.before_task(None, task())
    strategy.before_epoch(None, 7, 10, 1)
    assert strategy.weights is None
    strategy.before_epoch(None, 8, 10, 1)
    assert strategy.weights is not None
    off = DeiTLT(augment=False, drw=False)
    off.before_task(None, task())
    off.before_epoch(None, 9, 10, 1)
    assert off.weights is None


@pytest.mark.parametrize("teacher_input", ["augmented", "clean"])
def test_teacher_sees_the_augmented_batch_unless_clean(teacher_input):
    model, teacher = student(), Recording()
    strategy = DeiTLT(teacher_input=teacher_input, erase_prob=1.0)
    strategy.setup(model)
    strategy.before_task(model, task(teacher))
    torch.manual_seed(0)
    strategy.before_epoch(model, 0, 10, 1)
    clean, y = batch()
    x, soft, extra = strategy.prepare_batch(clean, y)
    assert soft.shape == (8, C) and torch.allclose(soft.sum(1), torch.ones(8))
    assert not torch.allclose(x, clean)  # strongly augmented
    assert torch.equal(extra, clean)  # the clean batch travels to loss as prepare_batch's extra
    strategy.loss(model, x, soft, extra)
    assert torch.equal(teacher.seen[-1], x if teacher_input == "augmented" else clean)


def test_no_mixup_in_the_drw_phase_gives_the_plain_labels():
    model = student()  # the reference (engine.py) passes the raw targets in its no-mixup DRW phase
    strategy = DeiTLT(drw_epoch=1, no_mixup_drw=True, label_smoothing=0.1)
    strategy.before_task(model, task())
    strategy.before_epoch(model, 1, 2, 1)
    x, y = batch()
    _, labels, _ = strategy.prepare_batch(x, y)
    assert torch.equal(labels, y)


def test_teacher_input_resize():
    model = student()
    seen = []

    def teacher(images):
        seen.append(images.shape)
        return torch.zeros(len(images), C)

    strategy = DeiTLT(augment=False, teacher_input_size=12)
    strategy.before_task(model, task(teacher))
    x, y = batch()
    x, y, extra = strategy.prepare_batch(x, y)
    strategy.loss(model, x, y, extra)
    assert seen == [torch.Size([8, 3, 12, 12])]


def test_predict_gives_the_mean_and_each_head_as_variants():
    model, x = student().eval(), batch()[0]
    mean, variants = DeiTLT().predict(model, x)
    cls_logits, dist_logits = model.forward_both(x)
    torch.testing.assert_close(variants["cls"], cls_logits)
    torch.testing.assert_close(variants["dist"], dist_logits)
    torch.testing.assert_close(mean, model(x))


def test_deit_lt_needs_the_deit_model_and_checks_ranges():
    with pytest.raises(ConfigError, match="model.name"):
        DeiTLT().setup(resnet_cifar(SHAPE, depth=8))
    for kwargs, key in [({"alpha": 1.5}, "alpha"), ({"temperature": 0}, "temperature"),
                        ({"beta": 1.0}, "beta"), ({"drw_epoch": -1}, "drw_epoch")]:
        with pytest.raises(ConfigError, match=f"strategy.{key}"):
            DeiTLT(**kwargs)


def test_dist_head_learns_the_teacher():
    """On a tiny set, agreement of the DIST head with the teacher's predictions rises."""
    from clsim.data.base import ArrayDataset

    x, _ = batch(64, seed=5)
    teacher = Recording(seed=7).eval()
    labels = teacher.linear(x.flatten(1)).argmax(1)  # labels != teacher would also work; keep it clean
    y = torch.randint(0, C, (64,), generator=torch.Generator().manual_seed(9))  # labels unrelated to it
    model = student(seed=1)
    strategy = DeiTLT(augment=False, drw=False, alpha=0.9)
    strategy.setup(model)
    data = ArrayDataset(x, y)
    strategy.before_task(model, Task(Experience(0, tuple(range(C)), data, None), (), C, teacher))

    def agreement():
        with torch.no_grad():
            return (model.eval().forward_both(x)[1].argmax(1) == labels).float().mean().item()

    before = agreement()
    engine = Engine(TrainConfig(epochs=30, batch_size=16, lr=3e-3, optimizer="adam"), seed=0)
    engine.fit(model.train(), strategy, data, experience=0, label="fit")
    after = agreement()
    assert after > before + 0.3 and after > 0.8, (before, after)


# --------------------------------------------------------------------------- augmentation


def test_batch_mixup_handles_odd_batches_and_keeps_the_input():
    x, y = batch(7)
    kept = x.clone()
    np.random.seed(0)
    xm, soft = BatchMixup(C, mixup=0.8, cutmix=0.0)(x, y)
    assert torch.equal(x, kept)  # timm mixes in place: ours works on a copy
    assert xm.shape == x.shape and soft.shape == (7, C)
    torch.testing.assert_close(soft.sum(1), torch.ones(7))
    torch.testing.assert_close(xm[-1], x[-1])  # the odd one out is unmixed
    assert not torch.allclose(xm[:-1], x[:-1])


def test_strong_augment_keeps_shape_and_each_images_range_and_is_seeded():
    x = batch(6)[0]
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        seed_global_generators()  # timm draws from random and NumPy
        out.append(StrongAugment(erase_prob=0.0)(x))
    assert out[0].shape == x.shape and torch.equal(out[0], out[1])
    assert (out[0].amin(dim=(1, 2, 3)) >= x.amin(dim=(1, 2, 3)) - 1e-5).all()
    assert (out[0].amax(dim=(1, 2, 3)) <= x.amax(dim=(1, 2, 3)) + 1e-5).all()
    grey = StrongAugment()(torch.randn(3, 1, 8, 8))
    assert grey.shape == (3, 1, 8, 8)


# --------------------------------------------------------------------------- metrics, models


def test_class_index_cuts_group_by_label():
    assert M.index_groups(10, [3, 7]) == ["head"] * 3 + ["medium"] * 4 + ["tail"] * 3
    summary = M.summarize([[0.5]], per_class_correct=[1, 2, 3, 4], per_class_total=[4, 4, 4, 4],
                          train_counts=[500, 400, 10, 5], class_index_cuts=[1, 3])
    assert (summary["head_accuracy"], summary["medium_accuracy"], summary["tail_accuracy"]) == (0.25, 0.625, 1.0)


def test_resnet_cifar_is_he_et_al_resnet32():
    model = resnet_cifar((3, 32, 32), depth=32)
    model.grow(10)
    assert sum(p.numel() for p in model.parameters()) == 464_154  # ~0.46M, as in He et al., Table 6
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="model.depth"):
        resnet_cifar((3, 32, 32), depth=30)


# --------------------------------------------------------------------------- the run


def lt_config(**strategy) -> dict:
    return {
        "name": "lt", "seed": 0,
        "data": {"name": "synthetic", "num_classes": 4, "samples_per_class": 40, "image_size": 8},
        "scenario": {"name": "long_tailed_class_incremental", "imbalance_ratio": 4, "n_tasks": 2},
        "model": {"name": "deit", "embed_dim": 16, "depth": 1, "num_heads": 2},
        "strategy": {"name": "deit_lt", **strategy},
        "train": {"epochs": 2, "batch_size": 16},
        "teacher": {"model": {"name": "resnet_cifar", "depth": 8, "width": 4},
                    "strategy": {"name": "logit_adjust"}, "train": {"sam_rho": 0.05, "lr": 0.01}},
    }


def test_teacher_section_is_validated():
    raw = lt_config()
    with pytest.raises(ConfigError, match="^teacher: strategy 'deit_lt' distils"):
        parse_config({k: v for k, v in raw.items() if k != "teacher"})
    with pytest.raises(ConfigError, match="^teacher: strategy 'finetune' does not use"):
        parse_config(raw | {"strategy": {"name": "finetune"}})
    parse_config({k: v for k, v in raw.items() if k != "teacher"} | {"strategy": {"name": "deit_lt",
                                                                                   "distillation": "none"}})
    bad = copy.deepcopy(raw)
    bad["teacher"]["train"]["lr"] = -1
    with pytest.raises(ConfigError, match="^teacher.train.lr"):
        parse_config(bad)
    bad["teacher"] = {"checkpoint": "/nonexistent/teacher"}
    with pytest.raises(ConfigError, match="^teacher.checkpoint: no such file"):
        parse_config(bad)
    bad["teacher"] = {"strategy": {"name": "finetune"}}
    with pytest.raises(ConfigError, match="^teacher.model: missing"):
        parse_config(bad)
    config = parse_config(raw)
    assert config.teacher.train.sam_rho == 0.05 and config.teacher.train.epochs == 2  # over the student's
    assert parse_config(config.to_dict()) == config


def test_run_trains_the_teacher_first_and_reports_it_and_both_heads(tmp_path):
    out = tmp_path / "run"
    metrics = clsim.experiment.run(parse_config(lt_config()), out, quiet=True)
    teacher = out / "teacher"
    assert (teacher / "metrics.json").exists() and (teacher / "report.md").exists()
    assert all((teacher / "checkpoints" / f"experience_{i}.pt").exists() for i in range(2))
    assert not (out / "checkpoints" / "experience_0.pt").exists()  # only a teacher keeps its models
    assert set(metrics["variants"]) == {"cls", "dist"}
    for name in ("cls", "dist"):
        assert len(metrics["variants"][name]["accuracy_matrix"]) == 2
    final = json.loads((teacher / "metrics.json").read_text())
    assert metrics["teacher"]["accuracy_per_experience"] == pytest.approx(final["accuracy_matrix"][-1])
    assert {"head_accuracy", "medium_accuracy", "tail_accuracy"} <= set(metrics["teacher"])


def test_resume_does_not_retrain_the_teacher_and_ends_as_uninterrupted(tmp_path, monkeypatch):
    config = parse_config(lt_config())
    straight = clsim.experiment.run(config, tmp_path / "straight", quiet=True)

    calls = []
    fit = Engine.fit

    def crash_in_the_students_second_experience(self, model, strategy, dataset, *, experience, **kwargs):
        calls.append((type(strategy).__name__, experience))
        if isinstance(strategy, DeiTLT) and experience == 1:
            raise KeyboardInterrupt
        return fit(self, model, strategy, dataset, experience=experience, **kwargs)

    monkeypatch.setattr(Engine, "fit", crash_in_the_students_second_experience)
    with pytest.raises(KeyboardInterrupt):
        clsim.experiment.run(config, tmp_path / "killed", quiet=True)
    assert calls == [("LogitAdjust", 0), ("LogitAdjust", 1), ("DeiTLT", 0), ("DeiTLT", 1)]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "killed" / "teacher").rglob("*") if p.is_file()}
    monkeypatch.setattr(Engine, "fit", fit)
    calls.clear()
    resumed = clsim.experiment.run(config, tmp_path / "killed", quiet=True, resume=True)
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # the teacher's files were not touched
    for key in ("accuracy_matrix", "variants", "teacher", "head_accuracy", "tail_accuracy"):
        assert resumed[key] == straight[key], key


def test_teacher_loaded_from_a_run_folder_or_a_weights_file_gives_the_same_student(tmp_path):
    raw = lt_config()
    raw["scenario"] = {"name": "long_tailed", "imbalance_ratio": 4}
    trained = clsim.experiment.run(parse_config(raw), tmp_path / "trained", quiet=True)
    from_run = copy.deepcopy(raw) | {"teacher": {"checkpoint": str(tmp_path / "trained" / "teacher")}}
    assert clsim.experiment.run(parse_config(from_run), tmp_path / "from_run", quiet=True)["accuracy_matrix"] == \
        trained["accuracy_matrix"]
    weights = tmp_path / "teacher.pt"
    state = torch.load(tmp_path / "trained" / "teacher" / "checkpoints" / "experience_0.pt")
    torch.save(state, weights)
    from_file = copy.deepcopy(raw)
    from_file["teacher"] = {"model": raw["teacher"]["model"], "checkpoint": str(weights)}
    assert clsim.experiment.run(parse_config(from_file), tmp_path / "from_file", quiet=True)["accuracy_matrix"] == \
        trained["accuracy_matrix"]


def test_a_teacher_file_that_does_not_fit_is_one_line_exit_2(tmp_path, capsys):
    raw = lt_config()
    raw["scenario"] = {"name": "long_tailed", "imbalance_ratio": 4}
    weights = tmp_path / "teacher.pt"
    torch.save({"not": torch.zeros(1)}, weights)
    raw["teacher"] = {"model": {"name": "resnet_cifar", "depth": 8}, "checkpoint": str(weights)}
    path = tmp_path / "lt.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher.checkpoint" in err[0] and "does not fit" in err[0]


def test_cli_keep_models_makes_a_run_usable_as_a_teacher(tmp_path):
    raw = lt_config()
    teacher_raw = {k: v for k, v in raw.items() if k != "teacher"} | {
        "model": raw["teacher"]["model"], "strategy": {"name": "logit_adjust"}}
    path = tmp_path / "teacher.yaml"
    path.write_text(yaml.safe_dump(teacher_raw))
    assert cli_main(["run", str(path), "--out", str(tmp_path / "t"), "--quiet", "--keep-models"]) == 0
    assert sorted(p.name for p in (tmp_path / "t" / "checkpoints").glob("experience_*.pt")) == \
        ["experience_0.pt", "experience_1.pt"]
    student = copy.deepcopy(raw) | {"teacher": {"checkpoint": str(tmp_path / "t")}}
    metrics = clsim.experiment.run(parse_config(student), tmp_path / "s", quiet=True)
    assert metrics["teacher"]["accuracy_per_experience"] == pytest.approx(
        json.loads((tmp_path / "t" / "metrics.json").read_text())["accuracy_matrix"][-1])


def test_a_model_the_strategy_cannot_train_fails_before_the_teacher_trains(tmp_path, capsys):
    raw = lt_config()
    raw["model"] = {"name": "vit", "embed_dim": 16, "depth": 1, "num_heads": 2}
    path = tmp_path / "lt.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["validate", str(path)]) == 2
    assert cli_main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "clsim: error: model.name: strategy 'deit_lt' trains the 'deit' or 'dhvt_distilled' model, got 'vit'"
    assert not (tmp_path / "run").exists()  # no teacher was trained
