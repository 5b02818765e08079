"""The Flower ClientApp: clsim's engine and CL strategy on one client's partition of the stream.

Three message handlers (``flwr.clientapp.ClientApp``, Message API):

- ``query``: which partition (client index) this node holds; the server maps nodes to clients.
- ``train``: load the global model, rebuild the client's CL strategy from its saved state,
  :meth:`Learner.learn <clsim.learner.Learner.learn>` on the local partition of the current
  experience (the same code path as a local run; FedProx's proximal term is an extra loss
  term), save the strategy state, reply with the weights.
- ``evaluate.consolidate``: at the end of an experience, with the final global model:
  :meth:`Learner.consolidate <clsim.learner.Learner.consolidate>` (EWC's Fisher, LwF's teacher,
  L2's anchor) on the local partition, and the accuracy on the client's own test data of all
  seen experiences.

The resolved experiment config travels in every message, so this app needs nothing else: it
runs unchanged in Flower's simulation engine, in-process, and on real SuperNodes. Before a
config is built, the code it names (plugin files, Avalanche plugins) is checked against the
node's own allow-list (:mod:`clsim.federated.trust`; refused: an error reply with the reason).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from clsim.federated.fleet import Tier, injected_fault
from clsim.federated.proximal import proximal_term
from clsim.federated.runtime import Runtime, runtime
from clsim.federated.state import ClientStore, state_bytes
from clsim.federated.submodels import bn_statistics, build_submodel, held_labels, mask_absent
from clsim.federated.trust import RefusedCode, check
from clsim.learner import Learner, grow_model, seed_everything
from clsim.scenarios.base import Experience
from clsim.seeds import seed_torch

app = ClientApp()


class InjectedFault(RuntimeError):
    """A failure the fleet profile's fault injection asked for (``fail_prob``, ``dropout``)."""


@dataclass
class Job:
    """One message's work: which client, which experience and round, where its state lives."""

    rt: Runtime
    client: int
    experience: int
    round: int
    step: int
    store: ClientStore
    config: ConfigRecord
    state_classes: int | None = None
    """Head size the restored strategy state was taken at (None: nothing restored)."""

    @property
    def tier(self) -> Tier:
        return self.rt.tiers[self.client]

    def experiences(self) -> tuple[Experience, list[Experience]]:
        """This client's partition of the current experience and of the ones it met before."""
        order = self.rt.order(self.client)
        exp = self.rt.client_experience(self.client, order[self.experience])
        return exp, [self.rt.client_experience(self.client, i) for i in order[: self.experience]]


def _job(msg: Message, context: Context) -> Job:
    cfg = msg.content["config"]
    rt = allowed_runtime(str(cfg["experiment"]), context)
    client = _client_index(cfg, context)
    state_dir = str(context.node_config.get("state-dir", cfg["state-dir"]))
    return Job(rt, client, int(cfg["experience"]), int(cfg["round"]), int(cfg["step"]),
               ClientStore(state_dir, client), cfg)


def allowed_runtime(text: str, context: Context) -> Runtime:
    """The experiment's :class:`Runtime`, once this node's allow-list admits every piece of code
    the config names (checked before parsing it, which would import them; :mod:`clsim.federated.trust`)."""
    check(text, context.node_config)
    return runtime(text)


def _client_index(cfg: ConfigRecord, context: Context) -> int:
    """The client this node plays: assigned by the server (simulation) or its partition id."""
    if "node-ids" in cfg:
        return int(cfg["client-ids"][list(cfg["node-ids"]).index(str(context.node_id))])
    return int(context.node_config["partition-id"])


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU: what travels in messages, whatever the device."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@dataclass
class _Kept:
    """A client's Learner as it was when it saved its newest state (see :func:`build_local`)."""

    rt: Runtime
    shape: tuple[float, float, bool]
    state_classes: int
    learner: Learner


def _shape(job: Job) -> tuple[float, float, bool]:
    """The client model's build settings the server sent: width ratio, Scaler rate, static BN."""
    return (float(job.config.get("model-ratio", 1.0)), float(job.config.get("scaler-rate", 1.0)),
            bool(job.config.get("static-bn", False)))


def build_local(job: Job, global_state: dict[str, torch.Tensor]) -> Learner:
    """This client's :class:`~clsim.learner.Learner`: the global model (or the sub-model it was
    sent) and its strategy, restored from its newest earlier state.

    Where this process saved that state itself (the in-process grid; a Ray worker or SuperNode
    that meets the client again), the Learner that saved it is reused instead of rebuilt from
    the config and the file: its strategy state is the one saved, and the model is overwritten
    below. A rebuild was most of a client's per-round overhead.
    """
    kept = job.store.take(before=job.step)
    if isinstance(kept, _Kept) and kept.rt is job.rt and kept.shape == _shape(job):
        seed_everything(job.rt.config.seed)  # as a rebuild leaves Python's and NumPy's streams
        learner, job.state_classes = kept.learner, kept.state_classes
    else:
        learner = _rebuild(job)
    grow_model(learner.model, job.rt.scenario, job.rt.head_size(job.experience))
    learner.model.load_state_dict(global_state)
    return learner


def _rebuild(job: Job) -> Learner:
    config, scenario = job.rt.config, job.rt.scenario
    seed_torch(config.seed)
    # a sub-model strategy (HeteroFL, FedConv) sends this client's tier a width-scaled model
    ratio, scaler_rate, static_bn = _shape(job)
    model = build_submodel(config.model, scenario.input_shape, ratio, scaler_rate=scaler_rate, static_bn=static_bn)
    learner = Learner.build(config, scenario=scenario, model=model)
    saved = job.store.load(before=job.step)
    # Unseeded growth: the global state overwrites every new row, and learn / consolidate
    # reseed before they draw (seeding each growth was a third of a client's per-round overhead).
    if saved is not None:
        # the state was saved with the head of its own experience (an LwF teacher has that shape)
        grow_model(learner.model, scenario, saved["num_classes"])
        learner.strategy.load_state_dict(saved["strategy"])
        job.state_classes = saved["num_classes"]
    return learner


def _save(job: Job, learner: Learner, num_classes: int) -> None:
    """Save the strategy state with the head size it was taken at (``num_classes``), which
    :func:`_rebuild` grows a fresh model to before loading it (an LwF teacher has that shape),
    and keep the Learner for :func:`build_local` to reuse."""
    state = learner.strategy.state_dict()
    job.store.save(job.step, {"num_classes": num_classes, "experience": job.experience, "strategy": state})
    nbytes = sum(t.numel() * t.element_size() for t in learner.model.state_dict().values())
    job.store.keep(job.step, _Kept(job.rt, _shape(job), num_classes, learner), nbytes + state_bytes(state))


def _enact_fault(job: Job) -> float:
    """Raise or hang as the fleet's fault injection draws for this client and step; the delay."""
    fault = injected_fault(job.tier, seed=job.rt.config.seed, step=job.step, client=job.client)
    if fault == "drop":
        raise InjectedFault(f"client {job.client} ({job.tier.name}) dropped mid-round (injected)")
    if fault == "raise":
        raise InjectedFault(f"client {job.client} ({job.tier.name}) raised (injected fault)")
    if fault == "hang":
        time.sleep(job.tier.hang_s)
        return job.tier.hang_s
    return 0.0


@contextlib.contextmanager
def cpu_threads(job: Job) -> Iterator[None]:
    """Torch's intra-op threads = the client's CPUs (``num_cpus_per_client``), as Ray gives an actor.

    Float reductions depend on the thread count, so every engine (Ray, in-process, SuperNodes)
    computing with the same count is what makes their numbers identical.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(job.rt.fed.num_cpus_per_client)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Reply with this node's partition id (the client index); warm up on the experiment if sent.

    Building the stream and the first partitions here (imports, data loading) keeps that
    one-off cost out of the first round's time.
    """
    if "config" in msg.content.config_records:
        try:  # a refused config is not built; its training messages then fail with the reason
            allowed_runtime(str(msg.content["config"]["experiment"]), context).partition(0, "train")
        except RefusedCode:
            pass
    metrics = MetricRecord({"partition-id": int(context.node_config["partition-id"]),
                            "num-partitions": int(context.node_config.get("num-partitions", -1))})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local continual learning on this client's partition of the current experience."""
    job = _job(msg, context)
    with cpu_threads(job):
        return _train(job, msg)


def _train(job: Job, msg: Message) -> Message:
    delay = _enact_fault(job)
    started = time.perf_counter()
    learner = build_local(job, msg.content["arrays"].to_torch_state_dict())
    mu = float(job.config.get("proximal-mu", 0.0))
    terms = [proximal_term(learner.model, mu=mu)] if mu > 0 else []
    exp, past = job.experiences()
    # HeteroFL / FedRolex: the classes this client holds (now or in an experience it met before)
    labels = held_labels([exp.train, *(e.train for e in past)])
    masked = mask_absent(learner.model, labels) if job.config.get("mask-absent", False) else None
    epochs = int(job.config["local-epochs"])
    stream = job.rt.stream_id(job.client, job.experience, job.round)
    loss, examples = learner.learn(exp, past, stream=stream, epochs=epochs, terms=terms, label="local")
    if masked is not None:  # the mask is this round's: consolidation and a reused Learner train unmasked
        masked.remove()
    # local training leaves what a strategy keeps across experiences (made in after_task) as it was
    # restored: saved with that head, not the grown one, or a teacher of the old head would be
    # loaded into a copy of the grown model next round
    _save(job, learner, job.state_classes or learner.model.num_classes)
    metrics = MetricRecord({"num-examples": examples, "train-loss": loss, "local-epochs": epochs,
                            "partition-id": job.client, "delay-s": delay,
                            "wall-s": time.perf_counter() - started})
    if job.config.get("report-labels", False):
        metrics["labels"] = labels
    arrays = ArrayRecord(cpu_state(learner.model))
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.query("bn_stats")
def bn_stats(msg: Message, context: Context) -> Message:
    """sBN (HeteroFL): the BN statistics of the global model sent, from train-mode passes over
    this client's partition of the current experience (no gradient, nothing trained)."""
    job = _job(msg, context)
    with cpu_threads(job):
        learner = build_local(job, msg.content["arrays"].to_torch_state_dict())
        exp, _ = job.experiences()
        sums, batches = _bn_sums(job, learner, exp)
    metrics = MetricRecord({"batches": batches, "partition-id": job.client})
    return Message(RecordDict({"arrays": ArrayRecord(sums), "metrics": metrics}), reply_to=msg)


def _bn_sums(job: Job, learner: Learner, exp: Experience) -> tuple[dict[str, torch.Tensor], int]:
    """:func:`bn_statistics` of the learner's model over this client's partition of ``exp``."""
    engine = learner.engine
    stream = job.rt.stream_id(job.client, job.experience, job.round)
    with torch.random.fork_rng(devices=[]):  # augmentation draws: not the training stream's
        seed_torch(stream)
        return bn_statistics(learner.model, engine.batches(
            exp.train, batch_size=engine.train.batch_size, shuffle=True, seed=stream))


def _own_bn_statistics(job: Job, learner: Learner, exp: Experience) -> None:
    """sBN for the client's own (sub-)model before it is evaluated: the global model's
    statistics, sliced to a narrower model, are not that model's (each of its channels sums
    fewer inputs), so a sub-model's statistics are computed, as sBN computes the global
    model's, from train-mode passes over this client's partition. Unchanged without data."""
    sums, batches = _bn_sums(job, learner, exp)
    if batches:
        learner.model.load_state_dict({k: v / batches for k, v in sums.items()}, strict=False)


@app.evaluate("consolidate")
def consolidate(msg: Message, context: Context) -> Message:
    """End of an experience: ``after_task`` on the local partition, then own-test accuracy."""
    job = _job(msg, context)
    with cpu_threads(job):
        return _consolidate(job, msg)


def _consolidate(job: Job, msg: Message) -> Message:
    learner = build_local(job, msg.content["arrays"].to_torch_state_dict())
    exp, past = job.experiences()
    learner.consolidate(exp, past, step=job.experience)  # the stream step's seed, as a local run
    _save(job, learner, learner.model.num_classes)  # after_task's state: the current head
    if job.config.get("bn-stats", False):
        _own_bn_statistics(job, learner, exp)
    rt, order = job.rt, job.rt.order(job.client)
    tests = [e for e in (rt.client_experience(job.client, i) for i in order[: job.experience + 1]) if len(e.test)]
    results = learner.evaluate(tests)
    correct, total = sum(int(r.correct.sum()) for r in results), sum(int(r.total.sum()) for r in results)
    metrics = MetricRecord({"num-examples": total, "correct": correct, "partition-id": job.client,
                            "accuracy": correct / total if total else 0.0})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
