"""Progress bars (rich) on stderr for training and evaluation; silent with ``--quiet``."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TaskID,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)


class Progress:
    """One place for everything a run shows while it works.

    Args:
        quiet: show nothing at all.
    """

    def __init__(self, *, quiet: bool = False):
        self.quiet = quiet
        self.console = Console(stderr=True, quiet=quiet)
        self._bars = RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            # 2 redraws a second: at rich's default 10, redraws cost up to 8% of a tiny model's
            # training time (benchmarks/overhead.py, clsim_progress)
            console=self.console, disable=quiet, refresh_per_second=2,
        )

    def __enter__(self) -> Progress:
        self._bars.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._bars.stop()

    def bar(self, description: str, total: int, *, transient: bool = False) -> Bar:
        """A new bar; ``transient`` bars disappear when done (evaluation)."""
        task = self._bars.add_task(description, total=total, info="")
        return Bar(self._bars, task, transient)

    def log(self, message: str) -> None:
        """A line above the bars."""
        self.console.print(message, highlight=False)


class Bar:
    """Handle to one progress bar."""

    def __init__(self, bars: RichProgress, task: TaskID, transient: bool):
        self._bars, self._task, self._transient = bars, task, transient

    def advance(self, steps: int = 1, info: str | None = None) -> None:
        fields = {} if info is None else {"info": info}
        self._bars.update(self._task, advance=steps, **fields)

    def close(self) -> None:
        if self._transient:
            self._bars.remove_task(self._task)
