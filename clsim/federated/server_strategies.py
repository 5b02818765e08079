"""Server strategies: registered factories that return Flower strategies (``flwr.serverapp.strategy``).

The section ``federated.server: {name: fedprox, mu: 0.01}`` calls ``fedprox(mu=0.01)``.
Flower's stateful server optimizers (FedAvgM, FedAdam, ...) keep the previous global arrays and
break when the classifier head grows between experiences; they are not registered (yet). The
federation driver (:mod:`clsim.federated.server`) owns the round loop over experiences and uses
the strategy's own hooks for each round: ``configure_train`` builds the messages for the
clients the fleet sampled, ``aggregate_train`` combines the replies that arrived in time. A
strategy that needs per-client payloads (FedConv's sub-models) overrides ``configure_train``;
the driver's node view carries each node's partition id and fleet tier (see
:class:`clsim.federated.server.SampledNodes`).

Flower is imported inside the factories, so configs validate without it installed.
"""

from __future__ import annotations

from typing import Any

from clsim.errors import ConfigError
from clsim.registry import SERVER_STRATEGIES

# The driver samples the clients itself (fleet availability, fixed seed), then hands the strategy
# exactly those nodes: take all of them, never wait for more.
_TAKE_ALL = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1,
             "min_evaluate_nodes": 0, "min_available_nodes": 1}


def _flower() -> Any:
    try:
        from flwr.serverapp import strategy
    except ImportError:  # pragma: no cover - the federated extra is missing
        raise ConfigError("federated.server", "needs Flower: pip install 'clsim[federated]'") from None
    return strategy


@SERVER_STRATEGIES.register("fedavg")
def fedavg() -> Any:
    """FedAvg (McMahan et al. 2017): the global model is the example-weighted mean of client models."""
    return _flower().FedAvg(**_TAKE_ALL)


@SERVER_STRATEGIES.register("fedprox")
def fedprox(*, mu: float = 0.01) -> Any:
    """FedProx (Li et al. 2020): FedAvg, with clients adding mu/2 ||w - w_global||^2 to their loss.

    Args:
        mu: weight of the proximal term (0 is FedAvg).
    """
    if mu < 0:
        raise ConfigError("federated.server.mu", f"expected a number >= 0, got {mu}")
    return _flower().FedProx(proximal_mu=mu, **_TAKE_ALL)

