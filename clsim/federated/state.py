"""Persistent state of a federated run: per-client strategy state and the server's checkpoint.

Client state (an EWC client's Fisher and anchors, an LwF client's teacher, ...) is the CL
strategy's ``state_dict()``, saved after every round the client works in, one file per step:
``DIR/<client>/s<step>.pt``. A client loads the newest file *older than the current step*, so
a round that is repeated after ``--resume`` starts from exactly the state it started from the
first time, even if the killed run had already saved that round's result.

Client state files are written atomically (a temp file renamed over the target: a killed run
never leaves half a file) but not fsync'ed: a round writes one per client, and an fsync each
(10-30 ms on a busy disk) would cost more than the round's training; the server's checkpoint,
which decides where ``--resume`` continues, still is. A process also keeps the states it saved
in memory (:data:`MEMORY_BUDGET` bytes, newest first) and hands a copy back when the file on
disk is still the one it wrote, instead of reading it back; with the in-process grid, and on a
Ray worker that meets the same client again, a client's next round reads nothing. Under the
same condition it keeps the live object that saved the state (the client's Learner,
:meth:`ClientStore.keep` / :meth:`ClientStore.take`), which the client reuses instead of
rebuilding it: a strategy's ``state_dict`` must therefore hold everything its next round
depends on, as it must for ``--resume`` (tests/test_federated_speed.py checks the registered
strategies compute the same either way).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clsim.engine.checkpoint import CHECKPOINT_KEY, RESUME_ADVICE, load_plain, save_plain, to_plain
from clsim.errors import ConfigError

_STEP = re.compile(r"^s(\d+)\.pt$")
STATE_KEY = "federated client state"  # the ConfigError key naming an unreadable client state file
MEMORY_BUDGET = 64 * 2**20
"""Bytes of tensors and arrays of client states a process keeps in memory (older ones are dropped)."""
_UMASK = os.umask(0o022)  # new files get 0666 minus the umask, as clsim.atomic's (mkstemp makes 0600)
os.umask(_UMASK)


class ClientStore:
    """One client's saved strategy states, keyed by the step they were saved after."""

    def __init__(self, root: str | Path, client: int):
        self.dir = Path(root) / f"{client:05d}"

    def _steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _STEP.match(p.name)))

    def _newest(self, *, before: int) -> Path | None:
        steps = [s for s in self._steps() if s < before]
        return self.dir / f"s{steps[-1]:07d}.pt" if steps else None

    def load(self, *, before: int) -> dict[str, Any] | None:
        """The newest state saved at a step < ``before``, or None."""
        path = self._newest(before=before)
        if path is None:
            return None
        kept = _memory.get(path)
        if kept is not None:
            return _copy(kept)
        # weights-only (clsim.engine.checkpoint.load_file): a state folder may come from elsewhere
        return load_plain(path, key=STATE_KEY)

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Save ``state`` as of ``step``; keep only the newest older state besides it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"s{step:07d}.pt"
        _write(path, to_plain(state))
        _memory.put(path, _copy(state))
        older = [s for s in self._steps() if s < step]
        for s in older[:-1]:
            (self.dir / f"s{s:07d}.pt").unlink(missing_ok=True)
            _memory.drop(self.dir / f"s{s:07d}.pt")
            _live.drop(self.dir / f"s{s:07d}.pt")

    def keep(self, step: int, obj: Any, nbytes: int) -> None:
        """Keep ``obj``, the live object whose state :meth:`save` just saved at ``step``, in this
        process (:data:`LIVE_BUDGET`), for :meth:`take` to hand back instead of a rebuild."""
        _live.put(self.dir / f"s{step:07d}.pt", obj, size=nbytes)

    def take(self, *, before: int) -> Any | None:
        """What :meth:`keep` kept with the state :meth:`load` would load, while that file is
        still the one this process wrote (else None), and forget it: the taker changes it, and
        only its next :meth:`keep` says it matches a saved state again (a round that fails
        half-way then rebuilds from the file)."""
        path = self._newest(before=before)
        if path is None:
            return None
        obj = _live.get(path)
        _live.drop(path)
        return obj


def _write(path: Path, plain: Any) -> None:
    """``torch.save(plain)`` into a temp file beside ``path``, renamed over it (no fsync)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            torch.save(plain, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy(obj: Any) -> Any:
    """A copy of a state that shares no tensor or array with ``obj``, tensors on the CPU (as a
    file read back gives them: a strategy may change what it loads in place)."""
    if isinstance(obj, torch.Tensor):
        out = obj.detach().to("cpu", copy=True)
        if isinstance(obj, torch.nn.Parameter):
            return torch.nn.Parameter(out, requires_grad=obj.requires_grad)
        return out.requires_grad_(obj.requires_grad) if obj.requires_grad else out
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):  # dict, OrderedDict (a module's state_dict, with its _metadata)
        out = type(obj)((k, _copy(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if type(obj) in (list, tuple, set, frozenset):
        return type(obj)(_copy(v) for v in obj)
    return obj  # immutable leaves: to_plain accepted nothing else


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors and arrays in a (nested) state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple | set | frozenset):
        return sum(state_bytes(v) for v in obj)
    return 0


class _Memory:
    """The client states this process wrote, by file, while the file is the one it wrote
    (same inode, size and modification time: a resumed run in another process may rewrite it)."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.items: OrderedDict[str, tuple[tuple[int, int, int], int, Any]] = OrderedDict()

    @staticmethod
    def _identity(path: Path) -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def put(self, path: Path, state: Any, *, size: int | None = None) -> None:
        key, size = str(path.absolute()), state_bytes(state) if size is None else size
        self.drop(path)
        identity = self._identity(path)
        if identity is None or size > self.budget:
            return
        self.items[key] = (identity, size, state)
        self.used += size
        while self.used > self.budget:
            _, (_, dropped, _) = self.items.popitem(last=False)
            self.used -= dropped

    def get(self, path: Path) -> Any | None:
        key = str(path.absolute())
        item = self.items.get(key)
        if item is None:
            return None
        if self._identity(path) != item[0]:
            self.drop(path)
            return None
        self.items.move_to_end(key)
        return item[2]

    def drop(self, path: Path) -> None:
        item = self.items.pop(str(path.absolute()), None)
        if item is not None:
            self.used -= item[1]


_memory = _Memory(MEMORY_BUDGET)
LIVE_BUDGET = 64 * 2**20
"""Bytes of the live objects (a client's Learner) :meth:`ClientStore.keep` holds per process."""
_live = _Memory(LIVE_BUDGET)


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
