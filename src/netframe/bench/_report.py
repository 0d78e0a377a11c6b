"""Showing results: a live progress bar, a summary table, JSON and the ``.hgrm`` file.

rich comes with ``pip install 'netframe[bench]'``; without it the bench still runs and
prints a plain summary. The chart (``--plot``) is drawn by ``_plot``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from netframe.bench._hgrm import percentile_distribution
from netframe.bench._histogram import Histogram
from netframe.bench._options import Progress

__all__ = ["live_progress", "print_summary", "summary_rows", "write_hdr", "write_json"]


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures a person reads first, as (label, value) pairs."""
    rows = [("scenario", result["scenario"]), ("target", result["options"]["target"])]
    window_s = result.get("window_s") or result["options"]["duration_s"]
    merged = result.get("merged")
    if merged:
        rows.append(("merged", f"{len(merged['runs'])} runs, windows overlapping "
                               f"{merged['overlap']:.0%} of {window_s:.1f} s"))  # fmt: skip
        if "warning" in merged:
            rows.append(("warning", merged["warning"]))
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


def write_hdr(result: dict[str, Any], path: Path) -> None:
    """The latency distribution as an ``.hgrm`` file, values in milliseconds."""
    histogram = Histogram.from_json(result["latency_histogram"])
    path.write_text(percentile_distribution(histogram))
