"""GCAB + CFDC (Cotogni et al.): the gated class-attention model and its strategies.

What is tested: gates freeze exactly what earlier tasks use (with SGD momentum and weight
decay on), inference needs no task id, the projector chain reaches only earlier tasks' heads,
checkpoint / resume through ``clsim.experiment.run`` is exact, the model takes any token
count, and bad configuration is a :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clsim.config import TrainConfig, parse_config
from clsim.engine.checkpoint import RunState, save_checkpoint
from clsim.engine.engine import Engine
from clsim.engine.progress import Progress
from clsim.errors import ConfigError
from clsim.experiment import run, train_and_evaluate
from clsim.learner import Learner
from clsim.models.gcab import GCABClassifier, gcab_vit
from clsim.registry import MODELS, STRATEGIES
from clsim.report.run_folder import CHECKPOINT, write_config
from clsim.scenarios.builders import class_incremental
from clsim.strategies.base import split_prediction
from clsim.strategies.gcab import GatedClassAttention

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"embed_dim": 16, "depth": 1, "num_heads": 2}
SGD = TrainConfig(epochs=2, batch_size=8, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=0.01,
                  eval_batch_size=64)


def tiny_model(shape=(1, 8, 8), seed: int = 0, **kwargs) -> GCABClassifier:
    torch.manual_seed(seed)
    return gcab_vit(shape, **(TINY_MODEL | kwargs))


@pytest.fixture
def scenario(make_source):
    """3 experiences x 2 classes of (1, 8, 8) Gaussian blobs, 16 train / 4 test images a class."""
    return class_incremental(make_source([16] * 6, shape=(1, 8, 8)), 0, n_tasks=3)


def learner_for(scenario, strategy, train: TrainConfig = SGD, seed: int = 0, **model_kwargs) -> Learner:
    model = tiny_model(scenario.input_shape, seed=seed, **model_kwargs)
    strategy.setup(model)
    return Learner(scenario, model, strategy, Engine(train, seed=0))


def train_upto(learner: Learner, upto: int, state: RunState | None = None) -> RunState:
    state = state or RunState()
    for index in range(state.next_experience, upto):
        train_and_evaluate(learner, index, state)
    return state


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("shape, patch, tokens", [((1, 8, 8), None, 16), ((3, 16, 16), 2, 64),
                                                  ((3, 16, 16), 4, 16), ((3, 32, 32), 4, 64),
                                                  ((1, 4, 4), None, 16)])
def test_model_takes_any_token_count_and_channels(shape, patch, tokens):
    model = tiny_model(shape, patch_size=patch).eval()
    assert model.backbone.patch_embed.num_patches == tokens
    for total in (3, 5, 6):  # three tasks, so two projectors sit in the chain
        model.grow(total)
    with torch.no_grad():
        logits = model(torch.randn(2, *shape))
    assert logits.shape == (2, 6) and torch.isfinite(logits).all()
    assert len(model.projectors) == 2 and model.task_sizes == [3, 2, 1]


def test_mhsa_backbone_and_paper_sizes_build():
    model = gcab_vit((3, 32, 32), embed_dim=48, depth=1, num_heads=12, patch_size=4, attention="mhsa")
    model.grow(10)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert model.block.num_heads == 12


def test_growing_adds_a_task_and_keeps_earlier_predictions():
    model = tiny_model(projector="residual").eval()
    model.grow(2)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        model.grow(5)
        after = model(x)
    assert model.num_tasks == 2 and len(model.projectors) == 1
    assert torch.equal(after[:, :2], before)  # a fresh residual projector is the identity
    model.grow(5)
    assert model.num_tasks == 2  # same size: nothing added
    with pytest.raises(ValueError, match="shrink"):
        model.grow(4)


# --------------------------------------------------------------------------- gates


def frozen_view(model: GCABClassifier, task: int) -> dict[str, torch.Tensor]:
    """The values of everything task ``task``'s predictions depend on, apart from the backbone."""
    g_attn, g_mlp = model.gates(task)
    usage = model.block.usage(g_attn, g_mlp)
    params = dict(model.block.named_parameters())
    view = {f"block.{n}": params[n].detach()[usage[n] > 0].clone() for n in usage}
    rows = model.head_rows(task)
    view |= {"token": model.task_tokens[task].detach().clone(), "e_attn": model.gate_attn[task].detach().clone(),
             "e_mlp": model.gate_mlp[task].detach().clone(), "head.weight": model.head.weight[rows].detach().clone(),
             "head.bias": model.head.bias[rows].detach().clone()}
    return view


def test_gates_freeze_what_earlier_tasks_use_bit_for_bit(scenario):
    """SGD with momentum and weight decay would move masked weights; after_step puts them back."""
    learner = learner_for(scenario, STRATEGIES.get("gcab_cfdc")())
    train_upto(learner, 1)
    model = learner.model
    kept = frozen_view(model, 0)
    block_before = copy.deepcopy(model.block.state_dict())
    patches = torch.randn(3, 16, 16)  # task 0's gated path on fixed features
    with torch.no_grad():
        path_before = model.task_logits(0, patches, model.gates(0))
    assert 0 < model.gates(0)[0].sum() < 16, "task 0 should use some, not all, channels"

    train_upto(learner, 3, RunState(next_experience=1))
    for name, value in frozen_view(model, 0).items():
        assert torch.equal(value, kept[name]), name
    with torch.no_grad():
        assert torch.equal(model.task_logits(0, patches, model.gates(0)), path_before)
    moved = [k for k, v in model.block.state_dict().items() if not torch.equal(v, block_before[k])]
    assert moved, "later tasks must still train the units task 0 left free"


def test_gate_scale_anneals_within_an_epoch_and_counts_steps_once_with_sam(scenario):
    strategy = STRATEGIES.get("gcab_cfdc")()
    sam = TrainConfig(epochs=1, batch_size=8, lr=0.01, optimizer="sgd", sam_rho=0.05, eval_batch_size=64)
    learner = learner_for(scenario, strategy, sam)
    strategy.before_epoch(learner.model, 0, 1, 4)
    assert strategy.gate_scale() == pytest.approx(1 / 800)
    strategy.step = 2
    assert strategy.gate_scale() == pytest.approx(1 / 800 + (800 - 1 / 800) / 2)
    train_upto(learner, 1)  # 32 images / 8 = 4 batches; SAM runs forward/loss twice a batch
    assert strategy.step == strategy.steps == 4


def test_sparsity_is_finite_when_earlier_tasks_use_every_unit():
    model = tiny_model()
    model.grow(2)
    model.grow(4)
    with torch.no_grad():
        model.gate_attn[0].fill_(1.0)
        model.gate_mlp[0].fill_(1.0)
    strategy = GatedClassAttention()
    strategy.setup(model)
    reg = strategy.sparsity(model, model.gates(1, 1.0))
    assert torch.isfinite(reg) and reg == 0


# --------------------------------------------------------------------------- inference


def test_inference_needs_no_task_id(scenario):
    strategy = STRATEGIES.get("gcab_cfdc")()
    learner = learner_for(scenario, strategy)
    state = train_upto(learner, 3)
    model = learner.model.eval()
    x, y = scenario.experiences[1].test.get_batch(torch.arange(6))
    with torch.no_grad():
        logits, _ = strategy.predict(model, x)  # from x alone
    assert logits.shape == (6, scenario.num_classes)
    assert torch.equal(logits, model(x))
    assert all(0 <= a <= 1 for a in state.rows[-1])


def test_no_chain_variant_reads_raw_features_for_every_task(scenario):
    """CFDC's prediction also scores every task on the current features; GCAB alone has no variant."""
    strategy = STRATEGIES.get("gcab_cfdc")()
    learner = learner_for(scenario, strategy)
    train_upto(learner, 3)
    model = learner.model.eval()
    x, _ = scenario.experiences[0].test.get_batch(torch.arange(5))
    cols = [model.head_rows(t) for t in range(3)]
    with torch.no_grad():
        logits, variants = strategy.predict(model, x)
        raw = model.logits_from_patches(model.backbone(x), s=None, project=False)
    assert set(variants) == {"no_chain"} and torch.equal(variants["no_chain"], raw)
    assert torch.equal(raw[:, cols[2]], logits[:, cols[2]])  # the newest task reads raw features anyway
    assert not torch.equal(raw[:, cols[0]], logits[:, cols[0]])  # trained projectors move old tasks
    gcab = STRATEGIES.get("gcab")()
    gcab.setup(model)
    with torch.no_grad():
        assert torch.equal(gcab.predict(model, x), raw)  # a tensor: nothing to compare against


def test_run_reports_the_no_chain_variant(tmp_path):
    metrics = run(parse_config(TINY_RUN), tmp_path / "run", quiet=True)
    no_chain = metrics["variants"]["no_chain"]
    assert len(no_chain["accuracy_matrix"]) == 3
    assert no_chain["accuracy_matrix"][0][0] == metrics["accuracy_matrix"][0][0]  # one task: no chain yet


def test_projector_chain_reaches_only_earlier_tasks(scenario):
    learner = learner_for(scenario, STRATEGIES.get("gcab_cfdc")())
    train_upto(learner, 3)
    model = learner.model.eval()
    x, _ = scenario.experiences[0].test.get_batch(torch.arange(5))
    cols = [model.head_rows(t) for t in range(3)]
    shift = torch.randn(16, generator=torch.Generator().manual_seed(0))  # not constant: LayerNorm removes that
    original = model.projectors[1].fc2.bias.detach().clone()
    with torch.no_grad():
        base = model(x)
        model.projectors[1].fc2.bias.add_(shift)  # P_2: task 2's features -> task 1's
        out = model(x)
    assert torch.equal(out[:, cols[2]], base[:, cols[2]])  # the newest task reads raw features
    assert not torch.equal(out[:, cols[1]], base[:, cols[1]])
    assert not torch.equal(out[:, cols[0]], base[:, cols[0]])  # cascaded: P_1(P_2(f))
    with torch.no_grad():
        model.projectors[1].fc2.bias.copy_(original)
        model.projectors[0].fc2.bias.add_(shift)  # P_1 only
        out = model(x)
    assert torch.equal(out[:, cols[1]], base[:, cols[1]]) and torch.equal(out[:, cols[2]], base[:, cols[2]])
    assert not torch.equal(out[:, cols[0]], base[:, cols[0]])


@pytest.mark.parametrize("kind", ["paper", "residual"])
def test_projectors_train_only_with_drift_compensation(scenario, kind):
    with_cfdc = learner_for(scenario, STRATEGIES.get("gcab_cfdc")(), projector=kind)
    without = learner_for(scenario, STRATEGIES.get("gcab")(), projector=kind)
    for learner in (with_cfdc, without):
        train_upto(learner, 2)
    assert with_cfdc.strategy.old_backbone is not None and without.strategy.old_backbone is None
    trained, untouched = with_cfdc.model.projectors[0].fc2.weight, without.model.projectors[0].fc2.weight
    assert trained.grad is not None and trained.grad.abs().sum() > 0
    assert untouched.grad is None or untouched.grad.abs().sum() == 0  # GCAB alone never reads it
    if kind == "residual":
        assert trained.abs().sum() > 0 and untouched.abs().sum() == 0  # trained away from / still the identity


# --------------------------------------------------------------------------- checkpoints


def through_checkpoint(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("name", ["gcab_cfdc", "gcab"])
def test_state_dict_round_trip_gives_identical_predictions_and_loss(scenario, name):
    strategy = STRATEGIES.get(name)()
    learner = learner_for(scenario, strategy)
    train_upto(learner, 2)
    model = learner.model
    x, y = scenario.experiences[1].train.get_batch(torch.arange(8))
    fresh = STRATEGIES.get(name)()
    fresh.setup(model)
    fresh.load_state_dict(through_checkpoint(strategy.state_dict()))
    model.train()
    with torch.no_grad():
        loss = strategy.loss(model, x, y)
        assert torch.equal(fresh.loss(model, x, y), loss)
        assert torch.equal(split_prediction(fresh.predict(model.eval(), x))[0],
                           split_prediction(strategy.predict(model, x))[0])


TINY_RUN = {
    "name": "gcab_tiny", "seed": 3,
    "data": {"name": "synthetic", "num_classes": 6, "samples_per_class": 20, "image_size": 8, "channels": 1},
    "scenario": {"name": "class_incremental", "n_tasks": 3},
    "model": {"name": "gcab_vit", **TINY_MODEL},
    "strategy": {"name": "gcab_cfdc", "bce": True},
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9,
              "weight_decay": 0.001},
}


def test_resume_mid_stream_through_experiment_run_is_exact(tmp_path):
    config = parse_config(TINY_RUN)
    full = run(config, tmp_path / "full", quiet=True)
    # stop after 2 experiences (a projector and an old backbone exist), then resume with run()
    learner = Learner.build(config, Progress(quiet=True))
    state = train_upto(learner, 2)
    write_config(config, tmp_path / "cut")
    save_checkpoint(tmp_path / "cut" / CHECKPOINT, state=state, model=learner.model,
                    strategy_state=learner.strategy.state_dict())
    resumed = run(config, tmp_path / "cut", resume=True, quiet=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["train_loss"] == full["train_loss"]


def test_bce_loss_is_one_hot_binary_cross_entropy():
    strategy = GatedClassAttention(bce=True)
    logits, y = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([2])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[0.0, 0.0, 1.0]]))
    assert torch.equal(strategy.classification(logits, y), expected)
    assert torch.equal(GatedClassAttention().classification(logits, y), expected)  # BCE is the default
    assert torch.equal(GatedClassAttention(bce=False).classification(logits, y),
                       torch.nn.functional.cross_entropy(logits, y))


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("kwargs, key", [({"lambda_": -1.0}, "strategy.lambda"), ({"s_max": 1.0}, "strategy.s_max"),
                                         ({"thres_emb": 0.0}, "strategy.thres_emb"),
                                         ({"clipgrad": -1.0}, "strategy.clipgrad"),
                                         ({"projector_weight": -0.1}, "strategy.projector_weight")])
def test_bad_strategy_arguments_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as err:
        GatedClassAttention(**kwargs)
    assert err.value.path == key


@pytest.mark.parametrize("name", ["gcab_cfdc", "gcab"])
def test_strategy_refuses_another_model(name, tiny_mlp):
    with pytest.raises(ConfigError) as err:
        STRATEGIES.get(name)().setup(tiny_mlp())
    assert err.value.path == "model.name" and "gcab_vit" in err.value.message


@pytest.mark.parametrize("shape, kwargs, key", [((1, 8, 8), {"embed_dim": 16, "num_heads": 3}, "model.num_heads"),
                                                ((1, 8, 8), {"patch_size": 3}, "model.patch_size"),
                                                ((1, 8, 4), {"patch_size": 2}, "model.attention"),
                                                ((1, 8, 8), {"depth": -1}, "model.depth")])
def test_bad_model_sizes_are_config_errors(shape, kwargs, key):
    with pytest.raises(ConfigError) as err:
        MODELS.get("gcab_vit")(shape, **kwargs)
    assert err.value.path == key


def test_yaml_section_is_the_constructor_call():
    raw = TINY_RUN | {"strategy": {"name": "gcab", "lambda": 0.1, "s_max": 400}}
    strategy = parse_config(raw).strategy.build()
    assert strategy.lambda_ == 0.1 and strategy.s_max == 400 and not strategy.drift_compensation
    with pytest.raises(ConfigError, match="strategy.lamda"):
        parse_config(TINY_RUN | {"strategy": {"name": "gcab", "lamda": 0.1}})


# --------------------------------------------------------------------------- shipped files


@pytest.mark.slow
def test_synthetic_gcab_scenario_runs_in_smoke_mode(tmp_path):
    from clsim.cli import main
    out = tmp_path / "smoke"
    assert main(["run", str(ROOT / "scenarios" / "synthetic_gcab.yaml"), "--smoke", "--quiet", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 5
    assert main(["validate", str(ROOT / "scenarios" / "cifar100_gcab.yaml")]) == 0


@pytest.mark.parametrize("classes", ["7", "5"])  # not a multiple of 5 tasks; 1 class a task
def test_benchmark_refuses_a_class_count_its_tasks_do_not_share(classes, capsys):
    spec = importlib.util.spec_from_file_location("gcab_cfdc_bench", ROOT / "benchmarks" / "gcab_cfdc.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_args(["--classes", "50"]).classes == 50
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(["--classes", classes])
    assert stop.value.code == 2
    assert f"--classes {classes}: expected a multiple of --tasks 5" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_tiny_mode_prints_rows_and_writes_the_report(tmp_path):
    report = tmp_path / "gcab.md"
    script = ROOT / "benchmarks" / "gcab_cfdc.py"
    rows_json = tmp_path / "gcab.json"
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--report", str(report), "--json", str(rows_json)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert json.loads(rows_json.read_text()) == result  # the report's rows file is what was printed
    cfdc = {"gcab_cfdc_paper", "gcab_cfdc_residual", "gcab_cfdc_chain"}
    assert set(result["rows"]) == {"finetune", "lwf", "ewc", "gcab"} | cfdc
    assert set(result["tuning"]) == {"lwf", "ewc", "gcab_cfdc_paper", "gcab_cfdc_chain"}  # on a validation split
    assert result["rows"]["gcab_cfdc_chain"]["projector_weight"] == 0.01  # the 1-point grid's value
    for name, row in result["rows"].items():  # CFDC rows also read without the chain
        assert ("no_chain_plasticity" in row) == (name in cfdc)
    for row in result["rows"].values():
        for key in ("average_incremental_accuracy", "last_accuracy", "forgetting", "plasticity"):
            assert {"mean", "std", "per_seed"} <= set(row[key])
            assert 0.0 <= row[key]["mean"] <= 1.0
        assert len(row["plasticity_per_task_mean"]) == 5 and "accuracy_matrix_seed0" in row
    text = report.read_text()
    assert "| gcab_cfdc_paper |" in text and "The paper's direction" in text and "Every task learnt" in text
    assert "read without the projector chain" in text


# --------------------------------------------------------------------------- issue 13: every task learnt


def test_gate_lr_scale_moves_the_embeddings_k_times_as_far_under_adam(scenario):
    """Adam steps ~lr whatever the gradient's scale: e = k r moves k times as far as with k = 1.

    Without the multiplier a short run leaves HAT's gates where N(0, 1) drew them (issue 13).
    """
    adam = TrainConfig(epochs=1, batch_size=8, lr=1e-3, optimizer="adam", eval_batch_size=64)
    moved = {}
    for k in (1.0, 50.0):
        strategy = STRATEGIES.get("gcab_cfdc")()
        torch.manual_seed(0)
        model = gcab_vit(scenario.input_shape, **TINY_MODEL, gate_lr_scale=k)
        strategy.setup(model)
        learner = Learner(scenario, model, strategy, Engine(adam, seed=0))
        learner.grow_to(2)
        start = [e.detach().clone() for e in model.embeddings(0)]
        assert start[0].std() == pytest.approx(1.0, rel=0.5)  # e ~ N(0, gate_init_std^2) for any k
        learner.learn(scenario.experiences[0])
        moved[k] = max(float((e.detach() - s).abs().max()) for e, s in zip(model.embeddings(0), start))
    steps = 4  # 32 images / batch 8
    assert moved[1.0] <= steps * 1e-3 * 1.05
    assert moved[50.0] > 10 * moved[1.0]


def test_gate_lr_scale_compensates_and_clamps_the_embedding_not_the_stored_parameter():
    """HAT's factor and its clamp act on e = k r: grad_r = k x HAT-compensated grad_e, |e| <= thres_emb."""
    k = 10.0
    model = tiny_model(gate_lr_scale=k)
    model.grow(2)
    strategy = GatedClassAttention(clipgrad=1e12)  # no clipping: the factor alone
    strategy.setup(model)
    strategy._frozen = strategy.frozen_entries(model)  # what before_task sets
    strategy.steps, strategy.step = 800, 1  # s = 1/800 + (800 - 1/800) / 800, about 1
    s = strategy.gate_scale()
    r = model.gate_attn[0]
    e = (k * r).detach()
    g_e = torch.randn_like(e)  # a gradient wrt e
    r.grad = k * g_e.clone()
    strategy.after_backward(model)
    hat = g_e * 800 / s * (torch.cosh(torch.clamp(s * e, -50, 50)) + 1) / (torch.cosh(e) + 1)
    torch.testing.assert_close(r.grad, k * hat)
    with torch.no_grad():
        r.fill_(1.0)  # e = 10 > thres_emb 6
    strategy.after_step(model)
    assert torch.allclose(model.embeddings(0)[0], torch.full_like(e, 6.0))


def test_project_in_training_sends_the_loss_through_but_not_into_the_projector():
    """Old tokens read P(f) in training as at test time; the BCE reaches the backbone through P,
    and only the drift loss trains P (with the classification gradient P collapsed)."""
    model = tiny_model()
    model.grow(2)
    model.grow(4)
    x = torch.randn(3, 1, 8, 8)
    for detach in (True, False):
        model.zero_grad(set_to_none=True)
        out = model.forward_train(x, 800.0, project=True, detach_projectors=detach)
        out.logits[:, :2].sum().backward()  # the old task's logits only
        projector_grads = [p.grad for p in model.projectors[0].parameters()]
        backbone_grad = model.backbone.patch_embed.proj.weight.grad
        assert backbone_grad is not None and backbone_grad.abs().sum() > 0
        if detach:
            assert all(g is None for g in projector_grads)
        else:
            assert any(g is not None and g.abs().sum() > 0 for g in projector_grads)
    with torch.no_grad():  # the same logits either way, and as at inference for the old task
        a = model.forward_train(x, 800.0, project=True, detach_projectors=True).logits
        b = model.forward_train(x, 800.0, project=True).logits
    assert torch.equal(a, b)


def test_strategy_detaches_the_projector_unless_asked(scenario):
    seen = []
    strategy = STRATEGIES.get("gcab_cfdc")(project_in_training=True)
    model = tiny_model(scenario.input_shape)
    strategy.setup(model)
    original = model.forward_train

    def spy(x, s, *, project=False, detach_projectors=False):
        seen.append((project, detach_projectors))
        return original(x, s, project=project, detach_projectors=detach_projectors)

    model.forward_train = spy
    model.grow(2)
    x, y = scenario.experiences[0].train.get_batch(torch.arange(4))
    strategy.loss(model, x, y)
    assert seen[-1] == (True, True)
    strategy.classification_trains_projector = True
    strategy.loss(model, x, y)
    assert seen[-1] == (True, False)


def test_bad_gate_lr_scale_is_a_config_error():
    with pytest.raises(ConfigError, match="model.gate_lr_scale"):
        tiny_model(gate_lr_scale=0.0)
