"""One base class for every server strategy: :class:`ServerStrategy`.

The federation driver (:mod:`clsim.federated.server`) owns the round loop over experiences
and calls a strategy's two round hooks, in the shape of Flower's strategy API:

    messages = configure_train(server_round, arrays, config, nodes)   # one message per sampled node
    arrays, metrics = aggregate_train(server_round, replies)          # the new global model (or None)

Everything else a strategy may do is a declared capability with a default here, never probed
with ``hasattr``: work on the server (``server_work``: :meth:`bind` receives a context with the
public set and model templates, and the run records server seconds per round), width-scaled
sub-models per client (``sub_models``, :meth:`client_ratio`, :meth:`consolidate_arrays`, and
:attr:`global_ratio` for a global model narrower than the configured one), a public set held
out by the server (``uses_public_data``), and learnt state (:meth:`state_dict`).

Flower's own strategies (FedAvg, FedProx, the FedOpt family) enter through
:class:`FlowerStrategy`, which builds the Flower object on first use: importing and
constructing a strategy needs neither Flower nor torch, so configs validate without them.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ServerStrategy:
    """Base of every registered server strategy (``federated.server: {name: ...}``).

    Capabilities (class attributes; the config checks read them from the unbuilt class):
        sub_models: sends width-scaled sub-models (the model must be one clsim can scale).
        uses_public_data: learns on a public set the server holds out (``federated.public_fraction``);
            an instance may turn it on from an option (``finetune``), so the config reads it from
            the built strategy.
        server_work: works on the server beyond averaging (gets :meth:`bind`; ``server_s`` is recorded).
        bn_stats: after each aggregation the round's participants compute the new global model's
            batch-norm statistics (:meth:`configure_bn_stats` / :meth:`aggregate_bn_stats`).
    """

    sub_models: ClassVar[bool] = False
    uses_public_data: bool = False
    server_work: ClassVar[bool] = False
    bn_stats: bool = False  # static BN (HeteroFL's sBN): after aggregation, clients compute the BN statistics

    def bind(self, context: Any) -> None:
        """Receive the run's :class:`~clsim.federated.substrategies.ServerContext` before the
        first round (called for ``server_work`` strategies only)."""

    @property
    def global_ratio(self) -> float:
        """Width of the global model relative to the configured model (1: the model itself)."""
        return 1.0

    def client_ratio(self, tier: Any) -> float:
        """Width ratio of the model a client of ``tier`` trains (1 without sub-models)."""
        return 1.0

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> list[Any]:
        """The ``train`` messages of one round: one per node in ``grid`` (the sampled nodes)."""
        raise NotImplementedError

    def aggregate_train(self, server_round: int, replies: list[Any]) -> tuple[Any, Any]:
        """``(ArrayRecord of the new global model or None, MetricRecord)`` from the replies."""
        raise NotImplementedError

    def configure_bn_stats(self, server_round: int, config: Any, nodes: list[int]) -> list[Any]:
        """The BN-statistics queries to ``nodes`` (``bn_stats`` strategies)."""
        raise NotImplementedError

    def aggregate_bn_stats(self, server_round: int, replies: list[Any]) -> Any:
        """The global model with the statistics the replies computed, or None (``bn_stats``)."""
        raise NotImplementedError

    def consolidate_arrays(self, server_round: int, arrays: Any, tier: Any) -> tuple[Any, float]:
        """The model (and its ratio) a client of ``tier`` consolidates with at an experience's end."""
        return arrays, 1.0

    def consolidate_options(self, ratio: float) -> dict[str, Any]:
        """What a client consolidating with a model of width ``ratio`` needs in its message config."""
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        """Learnt state the server checkpoint keeps for ``--resume`` (None: nothing to keep)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


# The driver samples the clients itself (fleet availability, fixed seed), then hands the strategy
# exactly those nodes: a Flower strategy takes all of them and never waits for more.
TAKE_ALL = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1,
            "min_evaluate_nodes": 0, "min_available_nodes": 1}


class FlowerStrategy(ServerStrategy):
    """A Flower strategy (``flwr.serverapp.strategy.<flower_class>``) as a :class:`ServerStrategy`.

    The Flower object (:attr:`flower`) is built on first use with ``flower_kwargs`` and
    :data:`TAKE_ALL`; the round hooks are its own.
    """

    flower_class: ClassVar[str] = "FedAvg"

    def __init__(self, **flower_kwargs: Any):
        self._flower_kwargs = flower_kwargs
        self._flower: Any = None

    @property
    def flower(self) -> Any:
        """The wrapped Flower strategy (imports Flower)."""
        if self._flower is None:
            from clsim.errors import ConfigError

            try:
                from flwr.serverapp import strategy
            except ImportError:  # pragma: no cover - the federated extra is missing
                raise ConfigError("federated.server", "needs Flower: pip install 'clsim[federated]'") from None
            self._flower = getattr(strategy, self.flower_class)(**self._flower_kwargs, **TAKE_ALL)
        return self._flower

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> list[Any]:
        return list(self.flower.configure_train(server_round, arrays, config, grid))

    def aggregate_train(self, server_round: int, replies: list[Any]) -> tuple[Any, Any]:
        return self.flower.aggregate_train(server_round, replies)
