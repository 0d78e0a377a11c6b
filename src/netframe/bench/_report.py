"""Showing results: a live progress bar, a summary table, JSON and a chart.

rich and matplotlib come with ``pip install 'netframe[bench]'``; without them the bench
still runs and prints a plain summary, and ``--plot`` says what to install.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from netframe.bench._options import Progress

__all__ = ["MissingExtra", "live_progress", "plot", "summary_rows", "write_json"]


class MissingExtra(RuntimeError):
    """An optional library is not installed; the message says how to get it."""


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures a person reads first, as (label, value) pairs."""
    rows = [("scenario", result["scenario"]), ("target", result["options"]["target"])]
    window_s = result.get("window_s") or result["options"]["duration_s"]
    if result.get("partial"):
        planned = result["options"]["duration_s"]
        rows.append(("partial", f"interrupted: {window_s:.1f} s of the {planned:g} s window"))
    if result["ops"] is not None:  # hold measures no operations
        rows.append(("operations", f"{result['ops']:,}"))
        rows.append(("throughput", f"{result['ops_per_s']:,.0f} ops/s"))
    if "mib_per_s" in result:
        rows.append(("bandwidth", f"{result['mib_per_s']:,.1f} MiB/s each way"))
    if "loss_ratio" in result:
        rows.append(("udp lost", f"{result['lost']:,} ({result['loss_ratio']:.2%})"))
    latency = result.get("latency_us")
    if latency:
        for key in ("p50", "p90", "p99", "p99.9", "max"):
            rows.append((f"latency {key}", f"{latency[key]:,.0f} us"))
    rows.append(("errors", f"{result['errors']:,}"))
    if result["first_error"]:
        rows.append(("first error", result["first_error"]))
    if result["connect_errors"]:
        rows.append(("connect errors", f"{result['connect_errors']:,}"))
    server = result["server"]
    if server.get("cpu_us_per_op") is not None:
        rows.append(("server cpu/op", f"{server['cpu_us_per_op']:.2f} us"))
        rows.append(("server cpu", f"{server['cpu_s'] / window_s:.0%}"))
    processes = server.get("processes")
    if processes:  # a supervisor and its workers: how the work was spread
        busy = [p for p in processes if p["cpu_s"] > 0 or p["connections"]]
        total = sum(p["cpu_s"] for p in busy) or 1.0
        split = " / ".join(f"{p['cpu_s'] / total:.0%}" for p in busy)
        rows.append(("server processes", f"{len(busy)} busy, cpu split {split}"))
        if any(p["connections"] for p in busy):
            counts = " / ".join(str(p["connections"] or 0) for p in busy)
            rows.append(("connections by process", counts))
    hold = result.get("hold")
    if hold:
        rows.append(("connections held", f"{hold['held']:,} of {hold['requested']:,}"))
        if "bytes_per_conn" in hold:
            rows.append(("server memory/conn", f"{hold['bytes_per_conn']:,.0f} bytes"))
        if "warning" in hold:
            rows.append(("warning", hold["warning"]))
    workers = result["options"]["workers"]
    rows.append(("client cpu", f"{result['client_cpu_pct']:.0f}% of one core ({workers} procs)"))
    return rows


def print_summary(result: dict[str, Any]) -> None:
    """A table on stdout: rich when installed, aligned text otherwise."""
    rows = summary_rows(result)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            print(f"{label:<{width}}  {value}")
        return
    table = Table(title="netframe bench", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in rows:
        table.add_row(label, value)
    Console().print(table)


@contextmanager
def live_progress(enabled: bool) -> Iterator[Progress | None]:
    """A rich progress bar for the run, or nothing when disabled or rich is missing."""
    try:
        from rich.progress import (
            BarColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )
    except ImportError:
        enabled = False
    if not enabled:
        yield None
        return
    bar = RichProgress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(), transient=True,
    )  # fmt: skip
    task = bar.add_task("starting", total=1.0, rate="")
    last: dict[str, float] = {"t": 0.0, "ops": 0.0}

    def update(phase: str, elapsed: float, total: float, ops: int) -> None:
        dt = elapsed - last["t"]
        rate = (ops - last["ops"]) / dt if dt >= 0.5 else None
        if rate is not None:
            last.update(t=elapsed, ops=ops)
            bar.update(task, rate=f"{rate:,.0f} ops/s")
        bar.update(task, description=phase, completed=elapsed, total=total)

    with bar:
        yield update


def write_json(result: dict[str, Any], path: Path) -> None:
    """Every figure, the options and the environment, as one JSON document."""
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


def plot(result: dict[str, Any], path: Path) -> None:
    """Throughput over time and the latency percentiles, in one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("--plot needs matplotlib: pip install 'netframe[bench]'") from None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    timeline = result["timeline_ops_per_s"]
    left.plot([i / 10 for i in range(len(timeline))], timeline)
    left.set(title="throughput", xlabel="seconds into the window", ylabel="ops/s")
    left.set_ylim(bottom=0)
    latency = result.get("latency_us") or {}
    labels = [k for k in ("p50", "p90", "p99", "p99.9", "max") if k in latency]
    right.bar(labels, [latency[k] for k in labels])
    right.set(title="latency", ylabel="microseconds")
    figure.suptitle(f"netframe bench: {result['scenario']} against {result['options']['target']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
