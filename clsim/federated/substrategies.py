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
from torch import nn

from clsim.errors import ConfigError
from clsim.federated.base import ServerStrategy
from clsim.federated.submodels import aggregate_windows, build_submodel, slice_state
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
    """One client's reply: its index, width ratio, trained sub-model and example count."""

    client: int
    ratio: float
    state: dict[str, torch.Tensor]
    num_examples: int


class SubModelStrategy(ServerStrategy):
    """Base of the sub-model strategies: per-tier payloads out, per-element aggregation back.

    Args:
        weighting: 'examples' weights each client's elements by its training examples (so a
            fleet of full-size clients is FedAvg exactly); 'uniform' counts clients, as the
            HeteroFL paper's code does.
    """

    sub_models = True  # the config refuses models :mod:`clsim.federated.submodels` cannot scale
    server_work = True  # slices and folds on the server (and needs model templates: bind)

    def __init__(self, *, weighting: Literal["examples", "uniform"] = "examples"):
        if weighting not in ("examples", "uniform"):
            raise ConfigError("federated.server.weighting", f"expected 'examples' or 'uniform', got {weighting!r}")
        self.weighting = weighting
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
        return aggregate_windows(state, [(u.state, self._weight(u), offset) for u in updates])

    def _weight(self, update: Update) -> float:
        return float(update.num_examples) if self.weighting == "examples" else 1.0

    # ------------------------------------------------------------------ the driver's calls
    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> list[Any]:
        """One ``train`` message per sampled node, each with its tier's sub-model."""
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

        state = arrays.to_torch_state_dict()
        self._global, self._experience, self._sent = state, int(config.get("experience", 0)), {}
        payloads: dict[float, Any] = {}
        messages = []
        for node_id, info in grid.info.items():
            ratio = self.client_ratio(info.tier)
            if ratio not in payloads:
                payloads[ratio] = ArrayRecord(self.submodel(server_round, state, ratio))
            self._sent[node_id] = (info.client, ratio)
            content = RecordDict({"arrays": payloads[ratio],
                                  "config": ConfigRecord(dict(config) | {"model-ratio": ratio})})
            messages.append(Message(content, dst_node_id=node_id, message_type="train"))
        return messages

    def aggregate_train(self, server_round: int, replies: list[Any]) -> tuple[Any, Any]:
        """Fold the replies that arrived into the global model."""
        from flwr.app import ArrayRecord, MetricRecord

        updates = []
        for reply in replies:
            client, ratio = self._sent[reply.metadata.src_node_id]
            updates.append(Update(client, ratio, reply.content["arrays"].to_torch_state_dict(),
                                  int(reply.content["metrics"]["num-examples"])))
        if not updates:
            return None, MetricRecord({})
        new = self.combine(server_round, self._global, updates)
        return ArrayRecord(new), MetricRecord({})

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
    averaged over the clients that hold it.

    Args:
        weighting: 'examples' (example-weighted, FedAvg when every client is full size) or 'uniform'.
    """

    def __init__(self, *, weighting: Literal["examples", "uniform"] = "examples"):
        super().__init__(weighting=weighting)


@SERVER_STRATEGIES.register("fedrolex")
class FedRolex(SubModelStrategy):
    """FedRolex (Alam et al., NeurIPS 2022): HeteroFL with a window that rolls one index per round.

    Every global channel is trained by small clients in turn. A client's sub-model index i is
    then a different global channel every round, so CL strategies with per-parameter state
    (``keeps_parameter_state``) are refused at parse time
    (:func:`clsim.federated.config.check_with_strategy`).

    Args:
        weighting: 'examples' or 'uniform' (see ``heterofl``).
    """

    def __init__(self, *, weighting: Literal["examples", "uniform"] = "examples"):
        super().__init__(weighting=weighting)

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
