"""Server strategies built on Flower's (``flwr.serverapp.strategy``), each a :class:`~clsim.federated.base.ServerStrategy`.

The section ``federated.server: {name: fedprox, mu: 0.01}`` calls ``fedprox(mu=0.01)``.
Flower's server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) keep per-array state (momentum,
moments) that breaks when the classifier head grows between experiences; the registered versions
grow that state with the model (zeros for the new rows: they have no history) and expose it as
``state_dict()`` / ``load_state_dict()`` so the server checkpoint keeps it for ``--resume``. The
federation driver (:mod:`clsim.federated.server`) owns the round loop over experiences and uses
the strategy's own hooks for each round: ``configure_train`` builds the messages for the
clients the fleet sampled, ``aggregate_train`` combines the replies that arrived in time. A
strategy that needs per-client payloads (FedConv's sub-models) overrides ``configure_train``;
the driver's node view carries each node's partition id and fleet tier (see
:class:`clsim.federated.server.SampledNodes`).

Each class checks its arguments in its constructor and builds its Flower strategy on first use
(:class:`~clsim.federated.base.FlowerStrategy`), so configs validate without Flower installed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from clsim.errors import ConfigError
from clsim.federated.base import FlowerStrategy
from clsim.registry import SERVER_STRATEGIES


@SERVER_STRATEGIES.register("fedavg")
class FedAvg(FlowerStrategy):
    """FedAvg (McMahan et al. 2017): the global model is the example-weighted mean of client models."""

    flower_class = "FedAvg"

    def __init__(self) -> None:
        super().__init__()


@SERVER_STRATEGIES.register("fedprox")
class FedProx(FlowerStrategy):
    """FedProx (Li et al. 2020): FedAvg, with clients adding mu/2 ||w - w_global||^2 to their loss.

    Flower's FedProx sends ``proximal-mu`` in every train message; clients add the term with
    :func:`clsim.federated.proximal.proximal_term`.

    Args:
        mu: weight of the proximal term (0 is FedAvg).
    """

    flower_class = "FedProx"

    def __init__(self, *, mu: float = 0.01):
        if not (mu >= 0 and math.isfinite(mu)):
            raise ConfigError("federated.server.mu", f"expected a finite number >= 0, got {mu}")
        super().__init__(proximal_mu=mu)


def _fit(key: str, old: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``old`` zero-padded at the end of each axis to ``shape`` (a grown head keeps its old rows first)."""
    if old.shape == shape:
        return old
    if old.ndim != len(shape) or any(o > n for o, n in zip(old.shape, shape)):
        raise RuntimeError(f"server optimizer state {key!r} has shape {old.shape}; the model's is {shape}: "
                           "a model may grow between experiences, never shrink")
    return np.pad(old, [(0, n - o) for o, n in zip(old.shape, shape)])


def _fit_all(state: dict[str, np.ndarray] | None, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
    """Per-array state resized to the model's current arrays; zeros for arrays that are new."""
    if not state:
        return state
    return {k: _fit(k, state[k], s) if k in state else np.zeros(s, dtype=np.float32) for k, s in shapes.items()}


def _shapes(arrays: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(a.shape) for k, a in arrays.items()}


class GrowingFedAvgM(FlowerStrategy):
    """Flower's FedAvgM whose momentum follows a growing model and is checkpointed."""

    flower_class = "FedAvgM"

    def __init__(self, **flower_kwargs: Any):
        super().__init__(**flower_kwargs)
        self._keys: list[str] = []  # array names, in the order of Flower's momentum vector

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> list[Any]:
        # The driver's global model is authoritative: after a head growth or a resume it is
        # what the next pseudo-gradient must be measured from.
        shapes, flower = _shapes(arrays), self.flower
        if flower.momentum_vector is not None:
            old = dict(zip(self._keys, flower.momentum_vector, strict=True))
            flower.momentum_vector = list(_fit_all(old, shapes).values())
        self._keys, flower.current_arrays = list(shapes), arrays
        return super().configure_train(server_round, arrays, config, grid)

    def state_dict(self) -> dict[str, Any]:
        vector = self.flower.momentum_vector
        return {"momentum": None if vector is None else dict(zip(self._keys, vector, strict=True))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        momentum = state["momentum"]
        self._keys = list(momentum or [])
        self.flower.momentum_vector = None if momentum is None else list(momentum.values())


class GrowingFedOpt(FlowerStrategy):
    """A Flower FedOpt strategy whose moments follow a growing model and are checkpointed."""

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> list[Any]:
        shapes, flower = _shapes(arrays), self.flower
        flower.m_t, flower.v_t = _fit_all(flower.m_t, shapes), _fit_all(flower.v_t, shapes)
        return super().configure_train(server_round, arrays, config, grid)

    def state_dict(self) -> dict[str, Any]:
        return {"m_t": self.flower.m_t, "v_t": self.flower.v_t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flower.m_t, self.flower.v_t = state["m_t"], state["v_t"]


def _positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):  # inf steps give NaN weights
        raise ConfigError(f"federated.server.{key}", f"expected a finite number > 0, got {value}")


def _unit(key: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"federated.server.{key}", f"expected a number in [0, 1), got {value}")


@SERVER_STRATEGIES.register("fedavgm")
class FedAvgM(GrowingFedAvgM):
    """FedAvgM (Hsu et al. 2019): server SGD with momentum on the pseudo-gradient (global - mean of clients).

    Args:
        server_lr: server learning rate (1 with momentum 0 is FedAvg).
        momentum: server momentum.
    """

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9):
        _positive("server_lr", server_lr)
        _unit("momentum", momentum)
        super().__init__(server_learning_rate=server_lr, server_momentum=momentum)


def _check_fedopt(eta: float, tau: float, **betas: float) -> None:
    _positive("eta", eta)
    _positive("tau", tau)
    for key, beta in betas.items():
        _unit(key, beta)


@SERVER_STRATEGIES.register("fedadam")
class FedAdam(GrowingFedOpt):
    """FedAdam (Reddi et al. 2021, Adaptive Federated Optimization): Adam on the server's pseudo-gradient.

    ``eta_l`` (the clients' learning rate) is ``train.lr``; Flower only reports it.

    Args:
        eta: server learning rate.
        beta_1: first-moment decay.
        beta_2: second-moment decay.
        tau: adaptivity (added to the square root of the second moment).
    """

    flower_class = "FedAdam"

    def __init__(self, *, eta: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3):
        _check_fedopt(eta, tau, beta_1=beta_1, beta_2=beta_2)
        super().__init__(eta=eta, tau=tau, beta_1=beta_1, beta_2=beta_2)


@SERVER_STRATEGIES.register("fedyogi")
class FedYogi(GrowingFedOpt):
    """FedYogi (Reddi et al. 2021): Yogi's additive second-moment update on the server.

    Args:
        eta: server learning rate.
        beta_1: first-moment decay.
        beta_2: second-moment decay.
        tau: adaptivity.
    """

    flower_class = "FedYogi"

    def __init__(self, *, eta: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3):
        _check_fedopt(eta, tau, beta_1=beta_1, beta_2=beta_2)
        super().__init__(eta=eta, tau=tau, beta_1=beta_1, beta_2=beta_2)


@SERVER_STRATEGIES.register("fedadagrad")
class FedAdagrad(GrowingFedOpt):
    """FedAdagrad (Reddi et al. 2021): Adagrad on the server's pseudo-gradient.

    Args:
        eta: server learning rate.
        tau: adaptivity.
    """

    flower_class = "FedAdagrad"

    def __init__(self, *, eta: float = 0.1, tau: float = 1e-3):
        _check_fedopt(eta, tau)
        super().__init__(eta=eta, tau=tau)
