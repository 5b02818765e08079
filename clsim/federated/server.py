"""The server side of a federated run: experiences x rounds over any Flower ``Grid``.

:class:`Federation` is what a ServerApp's ``main(grid, context)`` does, whichever engine
delivers the messages (Flower's simulation engine, real SuperNodes, or the in-process grid):

    discover clients (query: node -> partition id)
    for each experience t:
        grow the global head to the classes seen so far
        for each round r:
            fleet: who is online; sample clients (a pure function of seed and step)
            server strategy's configure_train -> messages; grid.send_and_receive
            sort replies: arrived / failed / timed out / stragglers past the deadline
            server strategy's aggregate_train over the arrivals -> new global model
            evaluate the global model on every seen test set; checkpoint
        consolidate: participants run after_task with the final global model and report
            accuracy on their own test data; the accuracy-matrix row; checkpoint

Clients are sampled by the driver, not by Flower's ``sample_nodes`` (which draws from Python's
global ``random``): the sample must be reproducible and respect fleet availability. The
strategy is handed exactly the sampled nodes through :class:`SampledNodes`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from clsim.config import ExperimentConfig
from clsim.engine.engine import EvalResult
from clsim.engine.progress import Progress
from clsim.federated.client import cpu_state
from clsim.federated.fleet import Tier, online
from clsim.federated.runtime import Runtime, config_text
from clsim.federated.state import FedState, load_server, save_server
from clsim.learner import Learner, finish, grow_model, record_row
from clsim.report.run_folder import CHECKPOINT, CLIENT_STATE
from clsim.seeds import CLIENT_SAMPLE, PUBLIC_READS, derive_seed, seed_torch


@dataclass(frozen=True)
class NodeInfo:
    """What the server knows about a node: its client index and fleet tier."""

    node_id: int
    client: int
    tier: Tier


class SampledNodes:
    """The ``Grid`` view handed to a server strategy's ``configure_train``: only the sampled nodes.

    ``info`` maps node id -> :class:`NodeInfo`, for strategies that send per-tier payloads.
    """

    def __init__(self, nodes: list[NodeInfo]):
        self.info = {n.node_id: n for n in nodes}

    def get_node_ids(self) -> list[int]:
        return list(self.info)


def unaugmented(dataset: Any) -> Any:
    """``dataset`` reading its images without the training augmentation, where the data sits in
    memory behind :class:`~clsim.data.base.View` s (an :class:`~clsim.data.base.ArrayDataset`:
    sklearn digits, synthetic, tensors); any other data set is returned as it is."""
    from clsim.data.base import ArrayDataset, View

    if isinstance(dataset, View):
        return View(unaugmented(dataset.base), dataset.indices, dataset.label_map)
    if isinstance(dataset, ArrayDataset) and dataset.transform is not None:
        plain = copy.copy(dataset)  # shares the image tensor: nothing is copied
        plain.transform = None
        return plain
    return dataset


def bytes_of(content: RecordDict) -> int:
    """Bytes of the model payload (every ArrayRecord) of a message's content."""
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())


def check_partition(k: int, partitions: int, n: int, node: int, clients: dict[int, NodeInfo]) -> None:
    """A node's partition id against the federation's ``n`` clients and the nodes already mapped."""
    hint = f"each SuperNode needs --node-config 'partition-id=K num-partitions={n}' with its own K in 0..{n - 1}"
    if partitions not in (-1, n):
        raise RuntimeError(f"node {node} has num-partitions={partitions}, but federated.num_clients is {n} ({hint})")
    if not 0 <= k < n:
        raise RuntimeError(f"node {node} has partition-id={k}, outside 0..{n - 1} ({hint})")
    if k in clients:
        raise RuntimeError(f"nodes {clients[k].node_id} and {node} both have partition-id={k} ({hint})")


def failure_reason(message: Message) -> str:
    """A short reason from an error reply (Ray wraps the client's exception text)."""
    reason = message.error.reason or f"error code {message.error.code}"
    if "Message: " in reason:
        reason = reason.split("Message: ", 1)[1]
    return reason.strip().strip("'>\n ")[:200]


def training_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
    """FLOPs to train on one example: 3x the forward pass (backward ~ 2x forward; Kaplan et al. 2020)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    model.train(was_training)
    return 3.0 * counter.get_total_flops()


class Federation:
    """Drives one federated run over a grid and writes its run folder.

    Args:
        config: the experiment, with its ``federated`` section.
        out_dir: the run folder (client state lives in ``out_dir/federated/clients``).
        progress: bars and log lines.
        resume: continue from ``out_dir/checkpoints/last.pt`` if it exists.
        client_state_dir: where clients keep their strategy state (default under ``out_dir``).
        assign_clients: simulation: the server assigns client indices to nodes (and sends
            them in each message) instead of asking every node for its partition id.
    """

    def __init__(self, config: ExperimentConfig, out_dir: Path, progress: Progress, *,
                 resume: bool = False, client_state_dir: str | None = None, assign_clients: bool = False):
        self.config, self.fed, self.out_dir, self.progress = config, config.federated, Path(out_dir), progress
        self.learner = Learner.build(config, progress)
        tiers = self.fed.fleet.assign(self.fed.num_clients, config.seed)
        self.rt = Runtime(config, self.learner.scenario, tiers)
        self.text = config_text(config)
        self.state_dir = client_state_dir or str((self.out_dir / CLIENT_STATE).resolve())
        self.strategy = self.fed.server.build()
        self._bind_strategy()
        for t in range(len(self.rt.scenario)):  # bad partition settings fail now, as input errors
            self.rt.partition(t, "train")
        self.state = self._restore() if resume else FedState()
        self.nodes: dict[int, NodeInfo] = {}
        self.assign_clients = assign_clients
        self.flops: dict[float, float] = {}  # training FLOPs per example, per client model width

    # ------------------------------------------------------------------ the run
    def run(self, grid: Any) -> dict[str, Any]:
        """All experiences x rounds over ``grid``; returns the metrics written to the run folder."""
        started = time.perf_counter()
        self.nodes = self._discover(grid)
        T, R = len(self.rt.scenario), self.fed.rounds_per_experience
        bar = self.progress.bar("federated rounds", T * R)
        bar.advance(self.state.experience * R + self.state.round)
        for t in range(self.state.experience, T):
            if self.state.round == 0:
                self._grow(t)
            self.flops = {}
            while self.state.round < R:
                self._round(grid, t, self.state.round)
                self.state.round += 1
                self.state.elapsed_s, started = self.state.elapsed_s + time.perf_counter() - started, time.perf_counter()
                self._checkpoint()
                bar.advance()
            self._end_experience(grid, t)
            self.state.experience, self.state.round = t + 1, 0
            self.state.elapsed_s, started = self.state.elapsed_s + time.perf_counter() - started, time.perf_counter()
            self._checkpoint()
        bar.close()
        return self._finish()

    def _discover(self, grid: Any, wait_s: float = 300.0) -> dict[int, NodeInfo]:
        """Map every client index to a node.

        On a real federation a node holds its own partition, so every node is asked which one
        (a ``query`` message each). In simulation the nodes are interchangeable: client k is
        the k-th node by id and carries its index in each message, which spares N queries
        (at ~0.1 s of Flower's message round trip each, they dominated runs of 1,000+ clients).
        The simulation engine's workers were warmed up before the clock started
        (:func:`clsim.federated.runner.warm_up`).
        """
        n, deadline = self.fed.num_clients, time.monotonic() + wait_s
        while len(node_ids := sorted(grid.get_node_ids())) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(node_ids)} of {n} Flower nodes connected after {wait_s:.0f} s")
            time.sleep(0.2)
        if self.assign_clients:
            return {k: NodeInfo(node_ids[k], k, self.rt.tiers[k]) for k in range(n)}
        content = RecordDict({"config": ConfigRecord({"experiment": self.text})})
        queries = [Message(content, dst_node_id=node, message_type="query") for node in node_ids]
        clients: dict[int, NodeInfo] = {}
        failed = []
        for reply in grid.send_and_receive(queries, timeout=wait_s):
            if reply.has_error():
                failed.append(f"node {reply.metadata.src_node_id}: {failure_reason(reply)}")
                continue
            k, node = int(reply.content["metrics"]["partition-id"]), reply.metadata.src_node_id
            check_partition(k, int(reply.content["metrics"].get("num-partitions", n)), n, node, clients)
            clients[k] = NodeInfo(node, k, self.rt.tiers[k])
        missing = sorted(set(range(n)) - set(clients))
        if missing:
            why = f"; {len(failed)} failed to answer ({failed[0]})" if failed else ""
            raise RuntimeError(f"no node holds partition(s) {missing[:10]} (each SuperNode needs "
                               f"--node-config 'partition-id=K num-partitions={n}'){why}")
        return {k: clients[k] for k in range(n)}

    def _bind_strategy(self) -> None:
        """Give a sub-model strategy (HeteroFL, FedConv, ...) its context; a strategy whose
        global model is narrower than the configured one (``fedavg_smallest``) gets it built."""
        self._public_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if not self.strategy.server_work:
            return
        from clsim.federated.substrategies import ServerContext
        from clsim.federated.submodels import build_submodel

        scenario = self.rt.scenario
        self.strategy.bind(ServerContext(
            model=self.config.model, input_shape=scenario.input_shape,
            ratios=[t.model_size_ratio for t in self.fed.fleet.tiers],
            grow=lambda model, n: grow_model(model, scenario, n), public=self._public, seed=self.config.seed))
        ratio = self.strategy.global_ratio
        if ratio < 1.0:
            seed_torch(self.config.seed)
            model = build_submodel(self.config.model, scenario.input_shape, ratio).to(self.learner.engine.device)
            self.learner.model = model
            self.learner.strategy.setup(model)

    def _public(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The server's public set at stream step ``t``: its held-out items of experiences 0..t
        (of all experiences with per-client orders), as CPU tensors.

        Only the latest set is cached (the stream only moves forward; keeping one per step
        would hold O(T^2) images). The images are un-augmented (:func:`unaugmented`); a source
        whose augmentation cannot be switched off is read on a forked RNG with a seed of its
        own, so the set is a pure function of the config and never moves the global stream.
        """
        seen = t + 1 if self.fed.class_order == "shared" else len(self.rt.scenario)
        if seen not in self._public_cache:
            parts = [unaugmented(self.rt.public(i)) for i in range(seen)]
            with torch.random.fork_rng(devices=[]):
                seed_torch(derive_seed(self.config.seed, seen, PUBLIC_READS))
                batches = [b for part in parts if len(part)
                           for b in self.learner.engine.batches(part, batch_size=1024)]
            if not batches:
                from clsim.errors import ConfigError
                raise ConfigError("federated.public_fraction", "the server holds no public data: it takes "
                                  "floor(fraction * items) of each class, 0 for every class here (raise it)")
            self._public_cache = {seen: (torch.cat([x.cpu() for x, _ in batches]),
                                         torch.cat([y.cpu() for _, y in batches]))}
        return self._public_cache[seen]

    def client_ratio(self, k: int) -> float:
        """Width of client ``k``'s model relative to the configured model (1 without sub-models)."""
        return self.strategy.client_ratio(self.rt.tiers[k])

    def client_flops(self, k: int) -> float:
        """FLOPs for client ``k`` to train on one example: its own (sub-)model's, per width."""
        ratio = self.client_ratio(k)
        if ratio not in self.flops:
            from clsim.federated.submodels import build_submodel

            # weights do not change FLOPs: built on a forked RNG, so the global stream is untouched
            with torch.random.fork_rng(devices=[]):
                seed_torch(self.config.seed)
                model = build_submodel(self.config.model, self.rt.scenario.input_shape, ratio)
                grow_model(model, self.rt.scenario, self.learner.model.num_classes)
            self.flops[ratio] = training_flops(model, self.rt.scenario.input_shape)
        return self.flops[ratio]

    def _grow(self, t: int) -> None:
        # the same seeds as a local run's growth: a one-client federation matches it; with
        # per-client orders any client may meet any class first, so the head has them all
        self.learner.grow_to(self.rt.head_size(t))

    # ------------------------------------------------------------------ one round
    def sample(self, step: int) -> tuple[list[int], int]:
        """The clients sampled at ``step`` (from those online) and how many were offline."""
        seed, n = self.config.seed, self.fed.num_clients
        up = [k for k in range(n) if online(self.rt.tiers[k], seed=seed, step=step, client=k)]
        size = min(self.fed.sample_size, len(up))
        chosen = np.random.default_rng([seed, step, CLIENT_SAMPLE]).choice(up, size=size, replace=False) if size else []
        return sorted(int(k) for k in chosen), n - len(up)

    def _message_config(self, t: int, r: int, step: int, clients: list[int]) -> ConfigRecord:
        epochs = self.fed.local_epochs or self.config.train.epochs
        config = {"experiment": self.text, "experience": t, "round": r, "step": step,
                  "state-dir": self.state_dir, "local-epochs": epochs}
        if self.assign_clients:  # which node plays which client (node ids exceed int64: strings)
            config |= {"node-ids": [str(self.nodes[k].node_id) for k in clients], "client-ids": list(clients)}
        return ConfigRecord(config)

    def _round(self, grid: Any, t: int, r: int) -> None:
        R = self.fed.rounds_per_experience
        step, server_round, started = t * (R + 1) + r, t * R + r + 1, time.perf_counter()
        chosen, offline = self.sample(step)
        arrays = ArrayRecord(cpu_state(self.learner.model))
        view = SampledNodes([self.nodes[k] for k in chosen])
        server_started = time.perf_counter()
        messages = list(self.strategy.configure_train(server_round, arrays, self._message_config(t, r, step, chosen), view))
        server_s = time.perf_counter() - server_started
        replies = list(grid.send_and_receive(messages, timeout=self.fed.round_timeout_s)) if messages else []
        record = self._sort_replies(messages, replies, chosen)
        kept = record.pop("_kept")
        if kept:
            server_started = time.perf_counter()
            new, _ = self.strategy.aggregate_train(server_round, kept)
            server_s += time.perf_counter() - server_started
            if new is not None and self.strategy.bn_stats:  # sBN (HeteroFL, FedRolex)
                new = self._bn_stats(grid, server_round, t, r, step, kept, record) or new
            if new is not None:
                self.learner.model.load_state_dict(new.to_torch_state_dict())
        last = r == R - 1
        evals = self._evaluate(t) if (self.fed.eval_every_round or last) else None
        record |= {"round": server_round, "experience": t, "round_in_experience": r + 1,
                   "sampled": chosen, "offline": offline,
                   "accuracy": None if evals is None else float(np.mean([e.accuracy for e in evals])),
                   "accuracy_per_experience": None if evals is None else [e.accuracy for e in evals],
                   "wall_time_s": round(time.perf_counter() - started, 3)}
        if self.strategy.server_work:  # strategies that work on the server: wall seconds of that work
            record["server_s"] = round(server_s, 4)
        self.state.rounds.append(record)
        self._log_round(record)

    def _bn_stats(self, grid: Any, server_round: int, t: int, r: int, step: int, kept: list[Message],
                  record: dict[str, Any]) -> ArrayRecord | None:
        """sBN: the round's participants compute the new global model's BN statistics on their data."""
        nodes = [m.metadata.src_node_id for m in kept]
        clients = [k for k in sorted(self.nodes) if self.nodes[k].node_id in nodes]
        messages = self.strategy.configure_bn_stats(server_round, self._message_config(t, r, step, clients), nodes)
        replies = list(grid.send_and_receive(messages, timeout=self.fed.round_timeout_s))
        record["bytes_down"] += sum(bytes_of(m.content) for m in messages)
        record["bytes_up"] += sum(bytes_of(m.content) for m in replies if not m.has_error())
        return self.strategy.aggregate_bn_stats(server_round, replies)

    def _sort_replies(self, messages: list[Message], replies: list[Message], chosen: list[int]) -> dict[str, Any]:
        """Arrivals, failures, time-outs, stragglers and bytes of one round; ``_kept`` to aggregate."""
        by_node = {m.metadata.src_node_id: m for m in replies}
        sent = {m.metadata.dst_node_id: bytes_of(m.content) for m in messages}
        rec = {"aggregated": [], "failed": {}, "timed_out": [], "stragglers": [], "empty": [],
               "bytes_down": sum(sent.values()), "bytes_up": 0, "client_flops": 0.0, "client_times_s": [], "_kept": []}
        deadline, losses = self.fed.round_deadline_s, []
        for k in chosen:
            reply = by_node.get(self.nodes[k].node_id)
            if reply is None:
                rec["timed_out"].append(k)
            elif reply.has_error():
                rec["failed"][str(k)] = failure_reason(reply)
            else:
                m, seconds, size = reply.content["metrics"], *self._client_time(k, reply, sent)
                rec["bytes_up"] += size
                rec["client_flops"] += self.client_flops(k) * float(m["num-examples"]) * float(m["local-epochs"])
                rec["client_times_s"].append(round(seconds, 4))
                if int(m["num-examples"]) == 0:
                    rec["empty"].append(k)
                elif deadline is not None and seconds > deadline:
                    rec["stragglers"].append(k)
                else:
                    rec["aggregated"].append(k)
                    rec["_kept"].append(reply)
                    losses.append((float(m["train-loss"]), int(m["num-examples"])))
        late = bool(rec["stragglers"] or rec["timed_out"]) and deadline is not None
        rec["simulated_time_s"] = deadline if late else max(rec["client_times_s"], default=0.0)
        rec["train_loss"] = sum(l * n for l, n in losses) / sum(n for _, n in losses) if losses else None
        if rec["failed"]:
            self.progress.log("  failed: " + "; ".join(f"client {k}: {why}" for k, why in rec["failed"].items()))
        return rec

    def _client_time(self, k: int, reply: Message, sent: dict[int, int]) -> tuple[float, int]:
        """Client ``k``'s simulated round time (see :meth:`Tier.round_time`) and its upload bytes."""
        m, size = reply.content["metrics"], bytes_of(reply.content)
        flops = self.client_flops(k) * float(m["num-examples"]) * float(m["local-epochs"])
        seconds = float(m["delay-s"]) + self.rt.tiers[k].round_time(
            flops=flops, bytes_down=sent[self.nodes[k].node_id], bytes_up=size)
        return seconds, size

    def _log_round(self, rec: dict[str, Any]) -> None:
        T, R = len(self.rt.scenario), self.fed.rounds_per_experience
        acc = "-" if rec["accuracy"] is None else f"{rec['accuracy']:.4f}"
        lost = len(rec["failed"]) + len(rec["timed_out"]) + len(rec["stragglers"])
        self.progress.log(
            f"round {rec['round']}/{T * R} (experience {rec['experience'] + 1}/{T}): "
            f"{len(rec['aggregated'])}/{len(rec['sampled'])} clients aggregated, {lost} lost, "
            f"{rec['offline']} offline; accuracy on seen {acc}; "
            f"{(rec['bytes_down'] + rec['bytes_up']) / 1e6:.2f} MB; simulated {rec['simulated_time_s']:.2f} s")

    # ------------------------------------------------------------------ experience boundary
    def _evaluate(self, t: int) -> list[EvalResult]:
        """The global model on the test sets of experiences 0..t (all of them with per-client
        orders, where every class may have been met); the server's own data."""
        experiences = self.rt.scenario.experiences
        return self.learner.evaluate(experiences[: t + 1] if self.fed.class_order == "shared" else experiences)

    def _end_experience(self, grid: Any, t: int) -> None:
        """Consolidation on the participants, their own-test accuracy, and the matrix row."""
        R, T = self.fed.rounds_per_experience, len(self.rt.scenario)
        trained = sorted({k for rec in self.state.rounds if rec["experience"] == t
                          for k in rec["aggregated"] + rec["stragglers"] + rec["empty"]})
        step = t * (R + 1) + R
        arrays = ArrayRecord(cpu_state(self.learner.model))
        config = self._message_config(t, R, step, trained)
        contents = self._consolidation_contents(t * R + R, arrays, config, trained)
        messages = [Message(contents[k], dst_node_id=self.nodes[k].node_id, message_type="evaluate.consolidate")
                    for k in trained]
        replies = list(grid.send_and_receive(messages, timeout=self.fed.round_timeout_s)) if messages else []
        client_of = {info.node_id: k for k, info in self.nodes.items()}
        accuracy, failed = {}, {}
        for reply in replies:
            k = client_of[reply.metadata.src_node_id]
            if reply.has_error():
                failed[str(k)] = failure_reason(reply)
            elif int(reply.content["metrics"]["num-examples"]):
                accuracy[str(k)] = float(reply.content["metrics"]["accuracy"])
        answered = {client_of[r.metadata.src_node_id] for r in replies}
        self.state.client_accuracy.append(dict(sorted(accuracy.items(), key=lambda kv: int(kv[0]))))
        self.state.consolidation.append({"experience": t, "clients": trained, "failed": failed,
                                         "timed_out": [k for k in trained if k not in answered],
                                         "bytes_down": sum(bytes_of(contents[k]) for k in trained)})
        evals = self._evaluate(t)
        record_row(self.state, evals, T)
        last = [rec for rec in self.state.rounds if rec["experience"] == t][-1]
        self.state.losses.append(last["train_loss"])
        mean_client = np.mean(list(accuracy.values())) if accuracy else float("nan")
        self.progress.log(f"experience {t + 1}/{T}: global accuracy on seen "
                          f"{np.mean([e.accuracy for e in evals]):.4f}, mean client accuracy {mean_client:.4f}")

    def _consolidation_contents(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                                clients: list[int]) -> dict[int, RecordDict]:
        """Each client's consolidation message: the global model, or its tier's sub-model (and
        ``model-ratio``) under a sub-model strategy, so client accuracy is its own model's."""
        if not self.strategy.sub_models:
            content = RecordDict({"arrays": arrays, "config": config})
            return {k: content for k in clients}
        by_ratio: dict[float, RecordDict] = {}
        out = {}
        for k in clients:
            ratio = self.client_ratio(k)
            if ratio not in by_ratio:
                sub, ratio = self.strategy.consolidate_arrays(server_round, arrays, self.rt.tiers[k])
                extra = {"model-ratio": ratio} | self.strategy.consolidate_options(ratio)
                by_ratio[ratio] = RecordDict({"arrays": sub, "config": ConfigRecord(dict(config) | extra)})
            out[k] = by_ratio[ratio]
        return out

    # ------------------------------------------------------------------ checkpoints and results
    def _checkpoint(self) -> None:
        # a server strategy with learnt state (FedConv's kernels, FedAvgM's momentum) saves it too
        extra = self.strategy.state_dict()
        save_server(self.out_dir / CHECKPOINT, self.state, self.learner.model, strategy=extra)

    def _restore(self) -> FedState:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            return FedState()
        payload = load_server(path)
        self.learner.grow_to(payload["num_classes"])
        self.learner.model.load_state_dict(payload["model"])
        if payload.get("server_strategy") is not None:
            self.strategy.load_state_dict(payload["server_strategy"])
        state = payload["federated"]
        self.progress.log(f"resuming at experience {state.experience + 1}, round {state.round + 1}")
        return state

    def _finish(self) -> dict[str, Any]:
        results = finish(self.config, self.learner, self.state, self.out_dir,
                         extra=federated_summary(self.config, self.state))
        self.progress.log(f"[bold]done[/] average accuracy {results['average_accuracy']:.4f} -> {self.out_dir}")
        return results


def federated_summary(config: ExperimentConfig, state: FedState) -> dict[str, Any]:
    """What metrics.json of a federated run adds to a local run's: rounds, bytes, clients, fleet."""
    fed = config.federated
    down = sum(r["bytes_down"] for r in state.rounds) + sum(c["bytes_down"] for c in state.consolidation)
    up = sum(r["bytes_up"] for r in state.rounds)
    client_means = [float(np.mean(list(a.values()))) if a else None for a in state.client_accuracy]
    results = {
        "num_clients": fed.num_clients,
        "server_strategy": fed.server.name,
        "fleet": fed.fleet.name,
        "communication_bytes": {"down": down, "up": up, "total": down + up},
        "client_flops": float(sum(r.get("client_flops", 0.0) for r in state.rounds)),
        "simulated_time_s": float(sum(r["simulated_time_s"] for r in state.rounds)),
        "failed_clients": sum(len(r["failed"]) + len(r["timed_out"]) for r in state.rounds),
        "dropped_stragglers": sum(len(r["stragglers"]) for r in state.rounds),
        "client_accuracy": state.client_accuracy,
        "mean_client_accuracy": client_means,
        "consolidation": state.consolidation,
        "rounds": state.rounds,
    }
    if any("server_s" in r for r in state.rounds):  # wall-clock: only where the server does real work
        results["server_time_s"] = round(float(sum(r.get("server_s", 0.0) for r in state.rounds)), 4)
    return results
