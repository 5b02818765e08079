"""Persistent state of a federated run: per-client strategy state and the server's checkpoint.

Client state (an EWC client's Fisher and anchors, an LwF client's teacher, ...) is the CL
strategy's ``state_dict()``, saved after every round the client works in, one file per step:
``DIR/<client>/s<step>.pt``. A client loads the newest file *older than the current step*, so
a round that is repeated after ``--resume`` starts from exactly the state it started from the
first time, even if the killed run had already saved that round's result.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clsim.engine.checkpoint import CHECKPOINT_KEY, RESUME_ADVICE, load_plain, save_plain
from clsim.errors import ConfigError

_STEP = re.compile(r"^s(\d+)\.pt$")
STATE_KEY = "federated client state"  # the ConfigError key naming an unreadable client state file


class ClientStore:
    """One client's saved strategy states, keyed by the step they were saved after."""

    def __init__(self, root: str | Path, client: int):
        self.dir = Path(root) / f"{client:05d}"

    def _steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _STEP.match(p.name)))

    def load(self, *, before: int) -> dict[str, Any] | None:
        """The newest state saved at a step < ``before``, or None."""
        steps = [s for s in self._steps() if s < before]
        if not steps:
            return None
        # weights-only (clsim.engine.checkpoint.load_file): a state folder may come from elsewhere
        return load_plain(self.dir / f"s{steps[-1]:07d}.pt", key=STATE_KEY)

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Save ``state`` as of ``step``; keep only the newest older state besides it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        save_plain(self.dir / f"s{step:07d}.pt", state)
        older = [s for s in self._steps() if s < step]
        for s in older[:-1]:
            (self.dir / f"s{s:07d}.pt").unlink(missing_ok=True)


@dataclass
class FedState:
    """What the server has done so far; with the global model, enough to continue a run.

    Attributes:
        experience: the experience being learnt.
        round: rounds of it already done (== rounds_per_experience: consolidation pending).
        rows: accuracy-matrix rows of finished experiences.
        rounds: one record per finished round (see :func:`clsim.federated.server.round_record`).
        client_accuracy: per finished experience, {client: accuracy on its own test data}.
        consolidation: per finished experience, what the end-of-experience phase reached.
        losses: mean client training loss of each experience's last round.
        elapsed_s: wall time spent before this process.
        final_correct / final_total / variant_rows / variant_correct: as in a local run's
            :class:`~clsim.engine.checkpoint.RunState` (filled by :func:`clsim.learner.record_row`
            from the global model's evaluations), so both summarise alike.
    """

    experience: int = 0
    round: int = 0
    rows: list[list[float | None]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    client_accuracy: list[dict[str, float]] = field(default_factory=list)
    consolidation: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    final_correct: list[int] = field(default_factory=list)
    final_total: list[int] = field(default_factory=list)
    variant_rows: dict[str, list[list[float | None]]] = field(default_factory=dict)
    variant_correct: dict[str, list[int]] = field(default_factory=dict)


def save_server(path: Path, state: FedState, model: torch.nn.Module, *, strategy: dict[str, Any] | None = None) -> None:
    """Write the server checkpoint atomically; ``strategy``: the server strategy's ``state_dict()``
    when it has learnt state (restored by ``load_state_dict`` on ``--resume``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"federated": asdict(state), "num_classes": model.num_classes, "model": model.state_dict(),
               "server_strategy": strategy}
    save_plain(path, payload)


def load_server(path: Path) -> dict[str, Any]:
    """The payload of :func:`save_server` with ``federated`` as a :class:`FedState`.

    Read weights-only; a truncated, corrupt or pickle-needing file is one :class:`ConfigError`
    (key ``--resume``) naming it.
    """
    payload = load_plain(path, key=CHECKPOINT_KEY, advice=RESUME_ADVICE)
    try:
        payload["federated"] = FedState(**payload["federated"])
    except (TypeError, KeyError) as exc:  # readable, but not a file save_server wrote
        raise ConfigError(CHECKPOINT_KEY, f"{path} is not a clsim federated checkpoint ({type(exc).__name__}: "
                                          f"{exc}){RESUME_ADVICE}") from None
    return payload
