"""The federation summary of ``report.md`` (runs with ``rounds`` in ``metrics.json``).

Reads plain metrics only: nothing here knows about Flower.
"""

from __future__ import annotations

from typing import Any

from clsim.report.markdown import md_table

MAX_ROUND_ROWS = 60


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def federation_markdown(metrics: dict[str, Any]) -> str:
    """Totals, per-experience client accuracy and a per-round table."""
    rounds = metrics.get("rounds") or []
    comm = metrics.get("communication_bytes") or {}
    lost = sum(len(r.get("failed", {})) + len(r.get("timed_out", [])) for r in rounds)
    lines = [
        f"- **clients**: {metrics.get('num_clients', '-')}, fleet `{metrics.get('fleet', '-')}`, "
        f"server strategy `{metrics.get('server_strategy', '-')}`, {len(rounds)} rounds",
        f"- **communication**: {_mb(comm.get('down'))} MB down, {_mb(comm.get('up'))} MB up, "
        f"{_mb(comm.get('total'))} MB in total (model payloads)",
        f"- **simulated time**: {metrics.get('simulated_time_s', 0.0):.2f} s over all rounds "
        f"(compute from FLOPs / tier GFLOP/s, transfer from bytes / bandwidth, deadline applied)",
        f"- **lost updates**: {lost} failed or timed out, {metrics.get('dropped_stragglers', 0)} "
        f"stragglers past the deadline",
    ]
    per_exp = md_table(["after experience", "mean client accuracy on own test data (%)", "clients"],
                       [[i, _pct(m), len(a)] for i, (m, a) in
                        enumerate(zip(metrics.get("mean_client_accuracy", []), metrics.get("client_accuracy", [])))])
    return "\n".join(lines) + "\n\n" + per_exp + "\n\n" + _round_table(rounds, md_table)


def _round_table(rounds: list[dict[str, Any]], md_table: Any) -> str:
    header = ["round", "exp", "sampled", "aggregated", "failed", "timed out", "stragglers",
              "offline", "MB down", "MB up", "sim. s", "accuracy (%)"]
    shown = rounds if len(rounds) <= MAX_ROUND_ROWS else rounds[: MAX_ROUND_ROWS // 2] + rounds[-MAX_ROUND_ROWS // 2:]
    rows = [[r["round"], r["experience"], len(r["sampled"]), len(r["aggregated"]), len(r["failed"]),
             len(r["timed_out"]), len(r["stragglers"]), r["offline"], _mb(r["bytes_down"]),
             _mb(r["bytes_up"]), f"{r['simulated_time_s']:.2f}", _pct(r.get("accuracy"))] for r in shown]
    failures = [f"- round {r['round']}, client {k}: {why}" for r in rounds for k, why in r["failed"].items()]
    note = "" if len(shown) == len(rounds) else f"\n\n({len(rounds) - len(shown)} middle rounds omitted; all are in metrics.json)"
    text = md_table(header, rows) + note
    if failures:
        text += "\n\nFailures:\n\n" + "\n".join(failures[:50])
    return text
