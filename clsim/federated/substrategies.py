"""Server strategies that send width-scaled sub-models: HeteroFL, FedRolex, FedAvg on the smallest model.

The federation driver (:mod:`clsim.federated.server`) calls a server strategy's
``configure_train`` with the sampled nodes and their fleet tiers, and ``aggregate_train``
with the replies. A :class:`SubModelStrategy` answers each node with the sub-model of its
tier's ``model_size_ratio`` (the message config carries ``model-ratio`` so the ClientApp
builds that architecture and trains it directly) and folds the replies back into the global
model. Subclasses change two things: how a sub-model is cut (:meth:`SubModelStrategy.submodel`)
and how the replies are combined (:meth:`SubModelStrategy.combine`). FedConv
(:mod:`clsim.federated.fedconv`) learns both on the server.

The driver hands a strategy a :class:`ServerContext` through ``bind`` before the first round.
Flower is imported inside the methods, so configs validate without it installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import clsim.federated.public_learning as pl
from clsim.errors import ConfigError
from clsim.federated.base import ServerStrategy
from clsim.federated.submodels import aggregate_windows, build_submodel, fold_bn_statistics, slice_state
from clsim.registry import SERVER_STRATEGIES


@dataclass
class ServerContext:
    """What a server strategy may use besides the messages: model templates and the public set.

    Attributes:
        model: the experiment's ``model`` section.
        input_shape: ``(C, H, W)`` of the stream's images.
        ratios: the fleet's tier ratios.
        grow: ``grow(model, num_classes)`` grows a fresh model's head the way the run did.
        public: ``public(t)`` -> ``(x, y)`` tensors of the server's held-out set at experience t.
        seed: the run's seed.
    """

    model: Any
    input_shape: tuple[int, ...]
    ratios: list[float]
    grow: Any
    public: Any
    seed: int
    _templates: dict[float, nn.Module] = field(default_factory=dict)
    _head: int = -1

    def template(self, ratio: float, num_classes: int) -> nn.Module:
        """A model of width ``ratio`` with ``num_classes`` outputs (cached; weights irrelevant).

        Only the current head size is kept (one model per tier): heads only grow, so older
        templates are never asked for again. Built on a forked RNG, so the global torch stream
        (dropout, augmentation) does not depend on whether the cache was warm: a resumed run
        draws what an uninterrupted one does.
        """
        if num_classes != self._head:
            self._templates, self._head = {}, num_classes
        if ratio not in self._templates:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model = build_submodel(self.model, self.input_shape, ratio)
                self.grow(model, num_classes)
            self._templates[ratio] = model
        return self._templates[ratio]

    def shapes(self, ratio: float, num_classes: int) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.template(ratio, num_classes).state_dict().items()}


def num_classes_of(state: dict[str, torch.Tensor]) -> int:
    """Head size of an :class:`~clsim.models.heads.IncrementalClassifier` state dict."""
    return int(state["head.weight"].shape[0])


@dataclass
class Update:
    """One client's reply: its index, width ratio, trained sub-model, example count and (when
    the strategy aggregates the head per label) the classes it holds."""

    client: int
    ratio: float
    state: dict[str, torch.Tensor]
    num_examples: int
    labels: list[int] | None = None


class SubModelStrategy(ServerStrategy):
    """Base of the sub-model strategies: per-tier payloads out, per-element aggregation back.

    Args:
        weighting: 'examples' weights each client's elements by its training examples (so a
            fleet of full-size clients is FedAvg exactly); 'uniform' counts clients, as the
            HeteroFL and FedRolex code do.
        scaler: HeteroFL's width ``Scaler``: a client of rate r divides every scaled layer's
            output by r / global rate in training.
        static_bn: sBN: clients train with batch statistics and track none; after aggregation
            the global model's BN statistics are computed on the participants' data
            (:meth:`configure_bn_stats` / :meth:`aggregate_bn_stats`).
        mask_absent: clients zero the training logits of the classes they hold no data for.
        label_aggregation: the head row of class c is averaged over the clients holding c only.
        finetune: epochs of server fine-tuning of the global model on the public set at the
            start of every round, before any sub-model is cut (FedConv's code:
            ``server_local_training``, 10 epochs, Adam 1e-4, in ``configure_fit``). 0: none.
            Any value > 0 makes the strategy hold a public set (``federated.public_fraction``).
        finetune_lr: Adam learning rate of that fine-tuning.
        batch_size: public-set examples per batch of every server learning phase.
        val_fraction: share of each class of the public set held out of all server learning;
            every phase keeps its epoch with the lowest loss on it (0: no selection, the last epoch).
        patience: stop a phase after this many epochs without a better validation loss (null: never).
    """

    sub_models = True  # the config refuses models :mod:`clsim.federated.submodels` cannot scale
    server_work = True  # slices and folds on the server (and needs model templates: bind)

    def __init__(self, *, weighting: Literal["examples", "uniform"] = "examples", scaler: bool = False,
                 static_bn: bool = False, mask_absent: bool = False, label_aggregation: bool = False,
                 finetune: int = 0, finetune_lr: float = 1e-4, batch_size: int = 64, val_fraction: float = 0.2,
                 patience: int | None = None):
        if weighting not in ("examples", "uniform"):
            raise ConfigError("federated.server.weighting", f"expected 'examples' or 'uniform', got {weighting!r}")
        for key, value in (("scaler", scaler), ("static_bn", static_bn), ("mask_absent", mask_absent),
                           ("label_aggregation", label_aggregation)):
            if not isinstance(value, bool):
                raise ConfigError(f"federated.server.{key}", f"expected true or false, got {value!r}")
        pl.check_int("finetune", finetune, 0)
        pl.check_rate("finetune_lr", finetune_lr)
        pl.check_int("batch_size", batch_size, 1)
        pl.check_int("patience", patience, 1, none=True)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
            raise ConfigError("federated.server.val_fraction", f"expected a number in [0, 1), got {val_fraction!r}")
        self.weighting = weighting
        self.scaler, self.static_bn, self.mask_absent = scaler, static_bn, mask_absent
        self.label_aggregation = label_aggregation
        self.finetune, self.finetune_lr, self.batch_size = finetune, float(finetune_lr), batch_size
        self.val_fraction, self.patience = float(val_fraction), patience
        if finetune:  # the config reads this from the built strategy to hold a public set
            self.uses_public_data = True
        self.phases: dict[str, pl.Phase] = {}  # per learning phase of the last round: what it did
        self._split: tuple[Any, tuple[pl.Batch, pl.Batch | None]] = (None, ((torch.zeros(0), torch.zeros(0)), None))
        self.ctx: ServerContext | None = None
        self._sent: dict[int, tuple[int, float]] = {}
        self._global: dict[str, torch.Tensor] = {}
        self._experience = 0

    def bind(self, ctx: ServerContext) -> None:
        """Receive the run's :class:`ServerContext` (before the first round)."""
        self.ctx = ctx

    def client_ratio(self, tier: Any) -> float:
        """Width ratio of the sub-model a client of ``tier`` trains."""
        return min(tier.model_size_ratio, 1.0)

    def offset(self, server_round: int) -> int:
        """Start of the slicing window along every shrunk dimension (0: HeteroFL's static slice)."""
        return 0

    # ------------------------------------------------------------------ hooks to override
    def submodel(self, server_round: int, state: dict[str, torch.Tensor], ratio: float, *,
                 learn: bool = True) -> dict[str, torch.Tensor]:
        """The sub-model state of width ``ratio`` cut from the global ``state`` (``learn``: a
        strategy with server-side learning may tune its compression first)."""
        if ratio == self.global_ratio:
            return dict(state)
        shapes = self.ctx.shapes(ratio, num_classes_of(state))
        return slice_state(state, shapes, self.offset(server_round))

    def combine(self, server_round: int, state: dict[str, torch.Tensor], updates: list[Update]) -> dict[str, torch.Tensor]:
        """The new global state from the clients' updates."""
        offset = self.offset(server_round)
        labels = [u.labels for u in updates] if self.label_aggregation else None
        return aggregate_windows(state, [(u.state, self._weight(u), offset) for u in updates], labels)

    # ------------------------------------------------------------------ the public set
    def public_parts(self) -> tuple[pl.Batch, pl.Batch | None]:
        """``(train, validation)`` parts of the public set of the current experience (validation
        None when ``val_fraction`` is 0); the split is a pure function of the seed and the labels."""
        x, y = self.ctx.public(self._experience)
        key = (self._experience, len(y))
        if self._split[0] != key:
            if self.val_fraction == 0:
                parts = ((x, y), None)
            else:
                train, val = pl.split_public(y, self.val_fraction, self.ctx.seed)
                parts = ((x[train], y[train]), (x[val], y[val]) if len(val) else None)
            self._split = (key, parts)
        return self._split[1]

    def learn_on_public(self, name: str, groups: list[dict], loss: Any, val_state: Any, model: nn.Module, *,
                        epochs: int | None, steps: int | None = None, seed: list[int]) -> pl.Phase:
        """One learning phase of ``groups`` on the public training part, selected on its validation
        part through ``val_state()`` (the weights the phase produces), recorded in :attr:`phases`."""
        train, val = self.public_parts()
        val_fn = pl.validation_loss(model, val_state, val) if val is not None else None
        phase = pl.learn(groups, loss, val_fn, train, epochs=epochs, steps=steps, batch_size=self.batch_size,
                         seed=[self.ctx.seed, *seed], patience=self.patience)
        self.phases[name] = phase
        return phase

    def finetune_global(self, server_round: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global model after ``finetune`` epochs of Adam on the public set (FedConv's
        ``server_local_training``), kept at its best validation epoch. BatchNorm buffers are
        left as they are: measured statistics, not learnt (sBN recomputes them after aggregation)."""
        model = self.ctx.template(self.global_ratio, num_classes_of(state))
        names = {name for name, _ in model.named_parameters()}
        params = {k: v.detach().clone().requires_grad_(True) for k, v in state.items() if k in names}
        buffers = {k: v for k, v in state.items() if k not in names}
        loss = lambda x, y: F.cross_entropy(pl.forward(model, params | buffers, x), y)  # noqa: E731
        self.learn_on_public("finetune", [{"params": list(params.values()), "lr": self.finetune_lr}], loss,
                             lambda: params | buffers, model, epochs=self.finetune, seed=[server_round, 0])
        return {k: (params[k].detach() if k in params else v) for k, v in state.items()}

    def _weight(self, update: Update) -> float:
        return float(update.num_examples) if self.weighting == "examples" else 1.0

    def client_options(self, ratio: float) -> dict[str, Any]:
        """What a client of width ``ratio`` needs in its message config to train as the method does.

        ``scaler-rate`` is HeteroFL's ``model_rate / global_model_rate``; ``static-bn``,
        ``mask-absent`` and ``report-labels`` switch sBN, logit masking and the label report on.
        Empty when every option is off, so such a client trains exactly as under FedAvg.
        """
        options: dict[str, Any] = {}
        if self.scaler and ratio < self.global_ratio:
            options["scaler-rate"] = ratio / self.global_ratio
        if self.static_bn:
            options["static-bn"] = True
        if self.mask_absent:
            options["mask-absent"] = True
        if self.label_aggregation:
            options["report-labels"] = True
        return options

    def consolidate_options(self, ratio: float) -> dict[str, Any]:
        """``bn-stats`` under sBN for a client narrower than the global model: the global
        statistics are the full-width model's, so the client measures its own model's on its
        partition before that model is evaluated (``client._own_bn_statistics``)."""
        return {"bn-stats": True} if self.static_bn and ratio < self.global_ratio else {}

    # ------------------------------------------------------------------ the driver's calls
    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> list[Any]:
        """One ``train`` message per sampled node, each with its tier's sub-model."""
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

        state = arrays.to_torch_state_dict()
        self._experience, self._sent, self.phases = int(config.get("experience", 0)), {}, {}
        if self.finetune:
            with pl.server_threads():
                state = self.finetune_global(server_round, state)
        self._global = state
        payloads: dict[float, Any] = {}
        messages = []
        for node_id, info in grid.info.items():
            ratio = self.client_ratio(info.tier)
            if ratio not in payloads:
                payloads[ratio] = ArrayRecord(self.submodel(server_round, state, ratio))
            self._sent[node_id] = (info.client, ratio)
            content = RecordDict({"arrays": payloads[ratio], "config": ConfigRecord(
                dict(config) | {"model-ratio": ratio} | self.client_options(ratio))})
            messages.append(Message(content, dst_node_id=node_id, message_type="train"))
        return messages

    def aggregate_train(self, server_round: int, replies: list[Any]) -> tuple[Any, Any]:
        """Fold the replies that arrived into the global model."""
        from flwr.app import ArrayRecord, MetricRecord

        updates = []
        for reply in replies:
            client, ratio = self._sent[reply.metadata.src_node_id]
            metrics = reply.content["metrics"]
            labels = [int(c) for c in metrics["labels"]] if "labels" in metrics else None
            updates.append(Update(client, ratio, reply.content["arrays"].to_torch_state_dict(),
                                  int(metrics["num-examples"]), labels))
        if not updates:
            return None, MetricRecord({})
        new = self.combine(server_round, self._global, updates)
        self._global = new
        return ArrayRecord(new), MetricRecord({})

    # ------------------------------------------------------------------ sBN: the global model's statistics
    @property
    def bn_stats(self) -> bool:
        """Whether the driver should run the sBN query after aggregation (``static_bn``)."""
        return self.static_bn

    def configure_bn_stats(self, server_round: int, config: Any, node_ids: list[int]) -> list[Any]:
        """One ``query.bn_stats`` message per node: the new global model, at the global width and
        without a scaler (HeteroFL's ``stats`` builds the global model, rate 1), whose BN
        statistics the client computes on its partition of the current experience."""
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

        content = RecordDict({"arrays": ArrayRecord(self._global),
                              "config": ConfigRecord(dict(config) | {"model-ratio": self.global_ratio})})
        return [Message(content, dst_node_id=node, message_type="query.bn_stats") for node in node_ids]

    def aggregate_bn_stats(self, server_round: int, replies: list[Any]) -> Any:
        """The global model with its BN running statistics the mean over every replying client's
        batches of the batch mean / unbiased variance (HeteroFL's ``momentum=None`` average);
        None when no client answered with data (the statistics stay as they were)."""
        from flwr.app import ArrayRecord

        parts = []
        for reply in replies:
            if reply.has_error():
                continue
            sums = reply.content["arrays"].to_torch_state_dict()
            parts.append((sums, int(reply.content["metrics"]["batches"])))
        if not any(n for _, n in parts):
            return None
        self._global = fold_bn_statistics(self._global, [p for p in parts if p[1]])
        return ArrayRecord(self._global)

    def consolidate_arrays(self, server_round: int, arrays: Any, tier: Any) -> tuple[Any, float]:
        """The sub-model (and its ratio) a client of ``tier`` consolidates with at an experience's end."""
        from flwr.app import ArrayRecord

        ratio = self.client_ratio(tier)
        with torch.no_grad():
            return ArrayRecord(self.submodel(server_round, arrays.to_torch_state_dict(), ratio, learn=False)), ratio


@SERVER_STRATEGIES.register("heterofl")
class HeteroFL(SubModelStrategy):
    """HeteroFL (Diao et al., ICLR 2021): static top-left channel slices, per-element averaging.

    Each client trains the top-left slice of every hidden dimension; each global element is
    averaged over the clients that hold it. The defaults are the public code's
    (``src/fed.py``, ``src/models``, ``src/train_classifier_fed.py``): clients counted
    uniformly, the width ``Scaler``, sBN, masked logits of absent classes and per-label head
    aggregation (see :class:`SubModelStrategy` and docs/fedconv.md for each).

    Args:
        weighting: 'uniform' (the code: each client counts 1) or 'examples' (example-weighted:
            FedAvg when every client is full size and all other options are off).
        scaler, static_bn, mask_absent, label_aggregation: the code's pieces, each switchable.
        finetune, finetune_lr, batch_size, val_fraction, patience: server fine-tuning of the
            global model on the public set (not HeteroFL's: FedConv's, as a control that gives
            HeteroFL the same public data; off by default), see :class:`SubModelStrategy`.
    """

    def __init__(self, *, weighting: Literal["examples", "uniform"] = "uniform", scaler: bool = True,
                 static_bn: bool = True, mask_absent: bool = True, label_aggregation: bool = True,
                 finetune: int = 0, finetune_lr: float = 1e-4, batch_size: int = 64, val_fraction: float = 0.2,
                 patience: int | None = None):
        super().__init__(weighting=weighting, scaler=scaler, static_bn=static_bn,
                         mask_absent=mask_absent, label_aggregation=label_aggregation, finetune=finetune,
                         finetune_lr=finetune_lr, batch_size=batch_size, val_fraction=val_fraction,
                         patience=patience)


@SERVER_STRATEGIES.register("fedrolex")
class FedRolex(SubModelStrategy):
    """FedRolex (Alam et al., NeurIPS 2022): HeteroFL with a window that rolls one index per round.

    Every global channel is trained by small clients in turn. A client's sub-model index i is
    then a different global channel every round, so CL strategies with per-parameter state
    (``keeps_parameter_state``) are refused at parse time
    (:func:`clsim.federated.config.check_with_strategy`).

    The defaults are the public code's (``resnet_server.py``, ``resnet_client.py``,
    ``models/resnet.py``): the Scaler, batch-statistics BN in training, masked logits and
    per-label head aggregation as HeteroFL, and its default ``weighting: avg``, i.e. every
    element averaged over the clients holding it, each counting 1 (its per-element update
    counts weigh every client of a round alike, so they cancel). The code evaluates its
    global model with test-batch statistics, not a stats query; ``static_bn: true`` here runs
    HeteroFL's query instead (documented in docs/fedconv.md).

    Args:
        weighting: 'uniform' (the code) or 'examples'.
        scaler, static_bn, mask_absent, label_aggregation: as ``heterofl``.
        finetune, finetune_lr, batch_size, val_fraction, patience: as ``heterofl`` (the control).
    """

    def __init__(self, *, weighting: Literal["examples", "uniform"] = "uniform", scaler: bool = True,
                 static_bn: bool = True, mask_absent: bool = True, label_aggregation: bool = True,
                 finetune: int = 0, finetune_lr: float = 1e-4, batch_size: int = 64, val_fraction: float = 0.2,
                 patience: int | None = None):
        super().__init__(weighting=weighting, scaler=scaler, static_bn=static_bn,
                         mask_absent=mask_absent, label_aggregation=label_aggregation, finetune=finetune,
                         finetune_lr=finetune_lr, batch_size=batch_size, val_fraction=val_fraction,
                         patience=patience)

    def offset(self, server_round: int) -> int:
        return server_round - 1


@SERVER_STRATEGIES.register("fedavg_smallest")
class SmallestFedAvg(SubModelStrategy):
    """FedAvg where the global model, and so every client's, is the smallest tier's sub-model
    (the one-size-fits-all baseline that FedConv and HeteroFL compare with)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def global_ratio(self) -> float:
        return min(min(self.ctx.ratios), 1.0)

    def client_ratio(self, tier: Any) -> float:
        return self.global_ratio


def public_batch(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of the public set, a pure function of ``seed`` (resume draws the same)."""
    rng = np.random.default_rng(seed)
    idx = torch.as_tensor(rng.choice(len(y), size=min(batch_size, len(y)), replace=False))
    return x[idx], y[idx]
