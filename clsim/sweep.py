"""``clsim sweep SWEEP.yaml``: a grid of experiments x seeds, each point an ordinary run folder.

A sweep file names one or more base experiment files, a grid over dotted config keys, the
seeds and the output folder::

    base: [scenarios/quickstart.yaml, scenarios/digits_ci.yaml]
    grid:
      strategy: [{name: finetune}, {name: ewc, lambda: 1000.0}]
      train.lr: [0.001, 0.0003]
    seeds: 3                        # or a list: [0, 1, 2]
    set: {train.epochs: 5}          # fixed overrides for every point (optional)
    out: runs/my_sweep              # default runs/<sweep file name>

Each point is exactly ``OMP_NUM_THREADS=N ... clsim run BASE --set KEY=VALUE ... --set seed=S
--out DIR``: it runs as that command in its own process (so one point cannot take the sweep
down), and ``sweep.json`` records the command. The thread count ``N`` (cores // ``--jobs``) is
part of the command because it changes the numbers slightly (the order of float sums); a point
keeps the count it started with when it is resumed under another ``--jobs``. A sweep stopped by
Ctrl-C, SIGTERM or SIGHUP stops its running points too and records them as ``interrupted``. Points run in local processes
(``--jobs``) or as Ray tasks (``--backend ray``). Every point's config is built before anything
runs, so a bad key fails the whole sweep at once with one line. A point whose folder holds
``metrics.json`` is skipped; one with a checkpoint is resumed (``--resume``).

Paths in the sweep file (``base``) are looked up like plugin files: the working directory, the
sweep file's folder, then its parent. ``out`` is relative to the working directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import yaml

from clsim.config import load_config, read_yaml
from clsim.errors import ConfigError, did_you_mean

SWEEP_KEYS = ("base", "grid", "seeds", "set", "out")
LOGS = "logs"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # torch's and BLAS's pools
STOP_GRACE_S = 10.0  # how long a stopped point may take to exit before it is killed
RAY_CONNECT_TIMEOUT_S = 10.0


@dataclasses.dataclass
class Point:
    """One run of the sweep: a base file, its overrides, a seed and a run folder."""

    id: str
    base: Path
    overrides: list[str]
    seed: int
    out: Path
    threads: int = 1  # OpenMP / BLAS threads of its process (part of its command)
    status: str = "pending"  # pending | running | done | skipped | failed | interrupted
    returncode: int | None = None
    wall_time_s: float | None = None
    error: str | None = None

    def command(self, *, resume: bool, absolute: bool = False) -> list[str]:
        """The ``clsim run`` arguments that this point is (paths absolute when ``absolute``)."""
        base, out = (self.base.resolve(), self.out.resolve()) if absolute else (self.base, self.out)
        args = ["run", str(base)]
        for item in self.overrides:
            args += ["--set", item]
        args += ["--out", str(out), "--quiet"]
        return args + (["--resume"] if resume else [])

    def env(self) -> dict[str, str]:
        """The thread-pool variables the point's process runs with."""
        return {k: str(self.threads) for k in THREAD_VARS}

    def record(self) -> dict[str, Any]:
        """This point as it goes into ``sweep.json``."""
        words = [f"{k}={v}" for k, v in self.env().items()] + ["clsim", *self.command(resume=False)]
        cmd = " ".join(_shell_quote(a) for a in words)
        return {"id": self.id, "dir": str(self.out), "seed": self.seed, "command": cmd,
                "threads": self.threads, "status": self.status, "returncode": self.returncode,
                "wall_time_s": self.wall_time_s, "error": self.error}


@dataclasses.dataclass
class Sweep:
    """A parsed sweep file: its points in run order and where they go."""

    path: Path
    out: Path
    points: list[Point]
    spec: dict[str, Any]
    out_key: str = "out"  # where ``out`` came from, for errors: the file's key or ``--out``


# ---------------------------------------------------------------- parsing

def load_sweep(path: str | Path, out: Path | None = None) -> Sweep:
    """Read and validate a sweep file; build (and so validate) every point's config."""
    path = Path(path)
    raw = read_yaml(path)
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{path}: {key}", f"unknown key{did_you_mean(str(key), SWEEP_KEYS)}; "
                                                f"expected {', '.join(SWEEP_KEYS)}")
    bases = _bases(path, raw.get("base"))
    grid = _grid(path, raw.get("grid") or {})
    fixed = [_override(k, v) for k, v in _fixed(path, raw.get("set") or {}).items()]
    seeds = _seeds(path, raw.get("seeds"))
    if not isinstance(raw.get("out", ""), str):
        raise ConfigError(f"{path}: out", f"expected a folder path, got {raw['out']!r}")
    out_key = "--out" if out else f"{path}: out"
    out = Path(out or raw.get("out") or Path("runs") / path.stem)
    check_out(out, out_key)
    points = list(expand(bases, grid, fixed, seeds, out))
    for point in points:
        _check_point(path, point)
    return Sweep(path=path, out=out, points=points, spec=raw, out_key=out_key)


def check_out(out: Path, key: str) -> None:
    """``out`` must be a folder, or creatable as one: found now, not as a traceback mid-sweep."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(key, f"{out} is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(key, f"{out} is not writable")
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(key, f"cannot create {out}: {parent} is not a writable folder")


def _bases(path: Path, raw: Any) -> list[Path]:
    items = raw if isinstance(raw, list) else [raw]
    if raw is None or not items or not all(isinstance(b, str) for b in items):
        raise ConfigError(f"{path}: base", "expected an experiment file or a list of them")
    found = [_find(b, path.parent) for b in items]
    missing = [b for b, f in zip(items, found) if f is None]
    if missing:
        raise ConfigError(f"{path}: base", f"experiment file not found: {missing[0]} "
                                            f"(looked in {Path.cwd()}, {path.parent} and its parent)")
    return found


def _find(file: str, sweep_dir: Path) -> Path | None:
    """``file`` relative to the working directory, the sweep file's folder or its parent."""
    for root in (Path.cwd(), sweep_dir, sweep_dir.parent):
        if (root / file).is_file():
            return Path(os.path.relpath(root / file)) if root != Path.cwd() else Path(file)
    return None


def _mapping(path: Path, key: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ConfigError(f"{path}: {key}", "expected a mapping of dotted config keys, e.g. train.lr")
    return raw


def _fixed(path: Path, raw: Any) -> dict[str, Any]:
    fixed = _mapping(path, "set", raw)
    if "seed" in fixed:  # the folder names and the report's grouping follow ``seeds``
        raise ConfigError(f"{path}: set.seed", "give seeds with the top-level 'seeds' key")
    return fixed


def _grid(path: Path, raw: Any) -> dict[str, list]:
    grid = _mapping(path, "grid", raw)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key}", "expected a non-empty list of values")
        if key == "seed":
            raise ConfigError(f"{path}: grid.seed", "give seeds with the top-level 'seeds' key")
        canon = [json.dumps(v, sort_keys=True, default=str) for v in values]
        twice = [v for v, c in zip(values, canon) if canon.count(c) > 1]
        if twice:  # e.g. [0.1, 0.10], equal once parsed: one point run twice into two folders
            raise ConfigError(f"{path}: grid.{key}", f"the value {twice[0]!r} is listed twice")
    return grid


def _seeds(path: Path, raw: Any) -> list[int] | None:
    """``None`` keeps each base file's own seed; an int n means seeds 0..n-1."""
    if raw is None:
        return None
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
        return list(range(raw))
    ok = isinstance(raw, list) and raw and all(isinstance(s, int) and not isinstance(s, bool)
                                               and s >= 0 for s in raw)
    if not ok or len(set(raw)) != len(raw):
        raise ConfigError(f"{path}: seeds", f"expected a count >= 1 or a list of distinct ints >= 0, got {raw!r}")
    return list(raw)


def _override(key: str, value: Any) -> str:
    """``KEY=VALUE`` as ``--set`` takes it; the value in YAML flow style, so it parses back equal."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9).strip()
    if text.endswith("\n..."):  # a plain scalar gets YAML's document-end marker
        text = text[: -len("\n...")]
    return f"{key}={text}"


def expand(bases: list[Path], grid: dict[str, list], fixed: list[str], seeds: list[int] | None,
           out: Path) -> Iterator[Point]:
    """Every (base, grid values, seed) combination, in that nesting order, as a :class:`Point`."""
    labels = {key: value_labels(key, values) for key, values in grid.items()}
    base_labels = _unique([Path(b).stem for b in bases])
    for base, base_label in zip(bases, base_labels):
        base_seed = read_yaml(base).get("seed", 0)
        for combo in itertools.product(*(range(len(v)) for v in grid.values())):
            parts = [base_label] if len(bases) > 1 else []
            parts += [",".join(labels[k][i] for k, i in zip(grid, combo))] if grid else []
            overrides = fixed + [_override(k, grid[k][i]) for k, i in zip(grid, combo)]
            for seed in seeds if seeds is not None else [base_seed]:
                folder = Path(*parts, f"seed{seed}") if parts else Path(f"seed{seed}")
                yield Point(id=folder.as_posix(), base=base, seed=seed, out=out / folder,
                            overrides=overrides + ([f"seed={seed}"] if seeds is not None else []))


def value_labels(key: str, values: list) -> list[str]:
    """Folder-name labels for a grid key's values: a section's name (with its arguments where
    two share a name), ``leaf=value`` for a scalar (the bare value for a ``.name`` key)."""
    leaf = key.rsplit(".", 1)[-1]

    def short(v: Any, detail: bool) -> str:
        if isinstance(v, dict):
            plugin = str(v.get("plugin") or "").rpartition(":")[2].rpartition(".")[2]
            head = "-".join(str(x) for x in (v.get("name"), plugin) if x) or leaf
            rest = [f"{k}={x}" for k, x in v.items() if k not in ("name", "plugin")]
            return ",".join([head, *rest]) if detail and rest else head
        return str(v) if leaf == "name" else f"{leaf}={v}"

    heads = [short(v, False) for v in values]
    labels = [short(v, heads.count(h) > 1) for v, h in zip(values, heads)]
    return _unique([re.sub(r"[^A-Za-z0-9._=,+-]", "_", s) for s in labels])


def _unique(labels: list[str]) -> list[str]:
    """Labels made distinct by a numeric suffix where two are the same."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label}_{seen[label]}")
    return out


def _check_point(path: Path, point: Point) -> None:
    """Build the point's config exactly as its ``clsim run`` will, so errors surface now."""
    try:
        load_config(point.base, point.overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path} (point {point.id})", str(exc)) from None


# ---------------------------------------------------------------- state of the run folders

def classify(point: Point) -> str:
    """``done`` (finished, same config), ``resume`` (checkpoint), ``stale`` (finished with another
    config: never overwritten) or ``new``."""
    from clsim.report.run_folder import CHECKPOINT, METRICS  # the run folder's file names

    if (point.out / METRICS).is_file():
        return "done" if _same_config(point) else "stale"
    return "resume" if (point.out / CHECKPOINT).is_file() else "new"


def _same_config(point: Point) -> bool:
    from clsim.config import parse_config
    from clsim.report.run_folder import CONFIG, first_difference

    saved = point.out / CONFIG
    if not saved.is_file():
        return False
    try:
        config = parse_config(yaml.safe_load(saved.read_text()), base_dir=point.base.parent)
    except (ConfigError, yaml.YAMLError):
        return False
    wanted = load_config(point.base, point.overrides).to_dict()
    # Like ``clsim run``'s own check: tracking (``report``) never changes the numbers.
    return first_difference(config.to_dict() | {"report": None}, wanted | {"report": None}) is None


# ---------------------------------------------------------------- running

def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or a job's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs() -> int:
    """Half the usable cores, each point with two torch threads: small CPU models gain little
    from more threads, and two processes per core would just contend."""
    return max(1, usable_cores() // 2)


def threads_per_job(jobs: int) -> int:
    """Torch threads per point, so that ``jobs`` points together use the cores once."""
    return max(1, usable_cores() // jobs)


@contextlib.contextmanager
def sweep_lock(out: Path, key: str = "out") -> Iterator[None]:
    """Hold ``out/.lock`` while the sweep runs: two sweeps into one folder would run the same
    unfinished points at once. The lock goes with the process, so a killed sweep leaves none."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = open(out / ".lock", "w")
    except OSError as exc:
        raise ConfigError(key, f"cannot create {out}: {exc.strerror or exc}") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(str(out), "another clsim sweep is running into this folder; "
                                        "wait for it or choose another out") from None
        yield


def assign_threads(sweep: Sweep, jobs: int) -> None:
    """Each point's thread count: cores // ``jobs``, except that a point whose folder exists keeps
    the count ``sweep.json`` recorded for it, so a resumed point goes on as it began."""
    before = _recorded_threads(sweep.out)
    for point in sweep.points:
        point.threads = before.get(point.id) if point.out.exists() and point.id in before \
            else threads_per_job(jobs)


def _recorded_threads(out: Path) -> dict[str, int]:
    try:
        points = json.loads((out / "sweep.json").read_text())["points"]
        return {p["id"]: p["threads"] for p in points
                if isinstance(p.get("threads"), int) and p["threads"] >= 1}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def run_sweep(sweep: Sweep, *, jobs: int | None = None, backend: str = "local",
              ray_address: str | None = None, echo: Callable[[str], None] = print) -> list[Point]:
    """Run every point that is not finished; return the points with their final status.

    A failing point is recorded (``sweep.json``, ``logs/<point>.log``) and the others go on.
    SIGTERM and SIGHUP stop the sweep like Ctrl-C: its running points are stopped and recorded
    as ``interrupted``, and the KeyboardInterrupt goes on to the caller.
    """
    jobs = jobs or default_jobs()
    check_out(sweep.out, sweep.out_key)
    assign_threads(sweep, jobs)
    with sweep_lock(sweep.out, sweep.out_key), signals_interrupt():
        return _run_points(sweep, jobs=jobs, backend=backend, ray_address=ray_address, echo=echo)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, so that the sweep's cleanup
    runs (a plain SIGTERM would end the sweep and leave its points running under PID 1). Only
    in the main thread, the one Python delivers signals to."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    caught = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {sig: signal.signal(sig, interrupt) for sig in caught}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_points(sweep: Sweep, *, jobs: int, backend: str, ray_address: str | None,
                echo: Callable[[str], None]) -> list[Point]:
    todo = []
    for point in sweep.points:
        state = classify(point)
        if state == "done":
            point.status = "skipped"
        elif state == "stale":
            point.status, point.error = "failed", (f"{point.out} holds a finished run of another config; "
                                                   f"delete it or choose another out")
        else:
            todo.append((point, state == "resume"))
    tracker = Tracker(sweep, echo)
    how = f"ray, num_cpus={threads_per_job(jobs)} per point" if backend == "ray" else f"local, {jobs} at a time"
    tracker.announce(len(todo), how)
    runner = run_ray if backend == "ray" else run_local
    children = Children()
    try:
        runner(todo, tracker, jobs=jobs, children=children, ray_address=ray_address)
    finally:  # an interrupted sweep stops its points, records what finished; a re-run does the rest
        children.stop_all()
        for point in sweep.points:
            if point.status == "running":
                point.status = "interrupted"
        tracker.save()
    return sweep.points


class Children:
    """The point processes running now. Each runs in its own session (process group), so that
    a terminal's Ctrl-C does not reach it directly: the sweep stops them all, and waits for
    them, when it stops itself."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopping = False

    def start(self, args: list[str], **kwargs: Any) -> subprocess.Popen | None:
        """A started process, or None once the sweep is stopping (no new point starts then)."""
        with self._lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(args, start_new_session=True, **kwargs)
            self._running.add(proc)
            return proc

    def finished(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._running.discard(proc)

    def stop_all(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM to every running point's process group, SIGKILL to those still there after
        ``grace_s``; return when all have exited."""
        with self._lock:
            self.stopping = True
            procs = list(self._running)
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the point and anything it started (data loader workers)
    except (ProcessLookupError, PermissionError):
        pass


def execute(args: list[str], log: str, threads: int, children: Children | None = None) -> tuple[int, float]:
    """Run ``clsim ARGS`` in a new Python process with its torch (OpenMP / BLAS) thread pools
    bounded to ``threads``, output to ``log``; return (exit code, seconds). The environment is
    that of the machine it runs on (a Ray node's own, not the driver's). Interrupted (Ctrl-C,
    or a Ray task cancelled), it stops the process before it returns."""
    children = children or Children()
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ) | {k: str(threads) for k in THREAD_VARS}
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = children.start([sys.executable, "-m", "clsim.cli", *args], stdout=fh,
                              stderr=subprocess.STDOUT, env=env)
        if proc is None:  # the sweep is stopping
            return -signal.SIGTERM, 0.0
        try:
            code = proc.wait()
        except BaseException:
            children.stop_all()
            raise
        finally:
            children.finished(proc)
    return code, time.perf_counter() - started


def run_local(todo: list[tuple[Point, bool]], tracker: Tracker, *, jobs: int, children: Children,
              ray_address: str | None = None) -> None:
    """Points in local processes, at most ``jobs`` at a time (threads only wait on them)."""
    def job(point: Point, resume: bool) -> tuple[int, float | None]:
        tracker.started(point)
        try:
            return execute(point.command(resume=resume, absolute=True), str(tracker.log_path(point)),
                           point.threads, children)
        except OSError as exc:  # e.g. its log cannot be written: this point failed, not the sweep
            point.error = f"cannot start the point: {exc}"
            return 1, None

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(job, point, resume): point for point, resume in todo}
        try:
            for future in as_completed(futures):
                tracker.finished(futures[future], *future.result())
        except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: stop the running points, start no more
            children.stop_all()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def run_ray(todo: list[tuple[Point, bool]], tracker: Tracker, *, jobs: int, children: Children,
            ray_address: str | None = None) -> None:
    """Points as Ray tasks of the point's thread count in CPUs (cores / ``jobs`` of this
    machine), on the cluster at ``ray_address`` or a local Ray; Ray runs as many at once as it
    has CPUs for, and every submitted point counts as running. Every node must see the base
    files and the output folder at the same paths (a shared file system): the points write their
    run folders there. A Ray this call started is shut down when it returns."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray", "Ray is not installed (pip install 'clsim[federated]')") from None
    if ray_address:
        _check_reachable(ray_address)
    owns_ray = not ray.is_initialized()
    try:
        ray.init(address=ray_address, ignore_reinit_error=True, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0]  # Ray's message runs to many lines
        raise ConfigError("--ray-address", f"cannot connect to Ray at {ray_address}: {why}") from None
    remote = ray.remote(execute)
    pending: dict[Any, Point] = {}
    try:
        for point, resume in todo:
            ref = remote.options(num_cpus=point.threads).remote(point.command(resume=resume, absolute=True), str(tracker.log_path(point)),
                                point.threads)
            pending[ref] = point
            tracker.started(point)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            point = pending.pop(ready[0])
            try:
                code, seconds = ray.get(ready[0])
            except Exception as exc:  # the task itself died (a node lost): the point failed, the sweep goes on
                code, seconds, point.error = 1, None, f"Ray task failed: {type(exc).__name__}"
            tracker.finished(point, code, seconds)
    except BaseException:
        _cancel(ray, list(pending))
        raise
    finally:
        if owns_ray:
            ray.shutdown()


def _cancel(ray: Any, refs: list[Any]) -> None:
    """Cancel Ray tasks: first as a KeyboardInterrupt in the task, so that :func:`execute`
    stops its process; then by force (the worker killed) for any still there after the grace."""
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref)
    with contextlib.suppress(Exception):
        ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_S)
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)


def _check_reachable(address: str) -> None:
    """Fail fast, in one line, when nothing listens at ``HOST:PORT``: ``ray.init`` would retry
    for minutes and has no timeout argument."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():  # "auto", "local": Ray finds the cluster itself
        return
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError("--ray-address", f"cannot reach {address}: {exc.strerror or exc}") from None


class Tracker:
    """Counts of done / running / failed points, one progress line per event, ``sweep.json``."""

    def __init__(self, sweep: Sweep, echo: Callable[[str], None]):
        self.sweep, self.echo = sweep, echo
        self.total = len(sweep.points)

    def log_path(self, point: Point) -> Path:
        return self.sweep.out / LOGS / (point.id.replace("/", "__") + ".log")

    def counts(self) -> str:
        n = {s: sum(p.status == s for p in self.sweep.points) for s in ("done", "skipped", "running", "failed")}
        return (f"[{n['done'] + n['skipped']}/{self.total} done, {n['running']} running, "
                f"{n['failed']} failed]")

    def announce(self, todo: int, how: str) -> None:
        skipped = sum(p.status == "skipped" for p in self.sweep.points)
        self.echo(f"sweep {self.sweep.path}: {self.total} points, {skipped} already done, "
                  f"{todo} to run ({how}) -> {self.sweep.out}")
        self.save()

    def started(self, point: Point) -> None:
        point.status = "running"

    def finished(self, point: Point, code: int, seconds: float | None) -> None:
        point.returncode = code
        point.wall_time_s = None if seconds is None else round(seconds, 1)
        if code == 0:
            point.status, point.error = "done", None
        else:
            point.status = "failed"
            point.error = point.error or last_line(self.log_path(point)) or f"exit code {code}"
        took = "" if seconds is None else f" ({seconds:.1f} s)"
        self.echo(f"{self.counts()} {point.status:<6} {point.id}{took}"
                  + (f": {point.error}" if code else ""))
        self.save()

    def save(self) -> None:
        from clsim.report.run_folder import atomic_write_json

        self.sweep.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.sweep.out / "sweep.json", {
            "sweep_file": str(self.sweep.path), "spec": self.sweep.spec,
            "points": [p.record() for p in self.sweep.points]})


def last_line(path: Path) -> str | None:
    """The last non-empty line of a point's log: its one-line error, or a traceback's last line."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[-1][:300] if lines else None


def _shell_quote(arg: str) -> str:
    return arg if re.fullmatch(r"[A-Za-z0-9_./=,:+-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"
