"""``--plot``: a run's (or a merge's) throughput over time and latency distribution, as a PNG.

Left, operations per second through the window, with errors and lost datagrams per
second on a second axis when there were any. Right, the latency distribution as
HdrHistogram plots it: latency on a log axis against the percentile on a log scale of
"nines" (90%, 99%, 99.9%, ...), with p50, p90, p99, p99.9 and the maximum labelled. A
line under the charts gives the totals, the errors (and the first one) and the UDP loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netframe.bench._hgrm import percentile_steps
from netframe.bench._histogram import Histogram

__all__ = ["MissingExtra", "plot"]

_LABELLED = ("p50", "p90", "p99", "p99.9")
# The percentile axis: 1 / (1 - percentile) is 1, 10, 100, ... at these.
_NINES = ("0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%")


class MissingExtra(RuntimeError):
    """An optional library is not installed; the message says how to get it."""


def _us(value: float) -> str:
    """A latency in microseconds, to three figures or more."""
    if value >= 100:
        return f"{value:,.0f} µs"
    return f"{value:.1f} µs" if value >= 10 else f"{value:.2f} µs"


def _title(result: dict[str, Any]) -> str:
    """What was measured, naming the server rather than a throw-away port."""
    options = result["options"]
    head = f"netframe bench: {result['scenario']}, {options.get('conns', '?')} connections"
    if "merged" in result:
        runs = len(result["merged"]["runs"])
        return f"{head}, {runs} runs merged, against {options['target']}"
    spawn_args = options.get("spawn_args")
    if spawn_args is None:
        return f"{head}, against {options['target']}"
    flags = " ".join(spawn_args)
    return f"{head}, a spawned netframe server{f' ({flags})' if flags else ''}"


def _totals(result: dict[str, Any]) -> tuple[str, bool]:
    """The line of totals under the charts, and whether it reports something wrong."""
    parts = [f"{result['ops']:,} operations in {result['window_s']:.3g} s"]
    parts.append(f"errors: {result['errors']:,}")
    if result["first_error"]:
        parts[-1] += f" (first: {result['first_error'][:70]})"
    bad = bool(result["errors"])
    if "loss_ratio" in result:
        parts.append(f"udp lost: {result['lost']:,} ({result['loss_ratio']:.2%})")
        bad = bad or bool(result["lost"])
    return "   ·   ".join(parts), bad


def plot(result: dict[str, Any], path: Path) -> None:
    """Draw ``result`` (of a run with operations, or of a merge) into the PNG ``path``.

    Raises:
        MissingExtra: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("--plot needs matplotlib: pip install 'netframe[bench]'") from None
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    _throughput(left, result)
    _latency(right, result)
    figure.suptitle(_title(result))
    totals, bad = _totals(result)
    figure.text(0.5, 0.015, totals, ha="center", fontsize="small", color="C3" if bad else "0.2")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _throughput(axis: Any, result: dict[str, Any]) -> None:
    timeline = result["timeline_ops_per_s"]
    seconds = [i / 10 for i in range(len(timeline))]
    axis.plot(seconds, timeline, color="C0", label="operations/s")
    axis.set(title="throughput", xlabel="seconds into the window", ylabel="operations/s")
    axis.set_ylim(bottom=0)
    axis.yaxis.set_major_formatter("{x:,.0f}")
    problems = [
        (key, label, colour)
        for key, label, colour in (
            ("timeline_errors_per_s", "errors/s", "C3"),
            ("timeline_lost_per_s", "udp lost/s", "C1"),
        )
        if any(result.get(key) or ())
    ]
    if not problems:
        return
    twin = axis.twinx()
    for key, label, colour in problems:
        steps = result[key]
        twin.plot([i / 10 for i in range(len(steps))], steps, color=colour, label=label)
    twin.set_ylabel(", ".join(label for _, label, _ in problems))
    twin.set_ylim(bottom=0)
    lines = axis.get_lines() + twin.get_lines()
    axis.legend(lines, [line.get_label() for line in lines], loc="lower right", fontsize="small")


def _latency(axis: Any, result: dict[str, Any]) -> None:
    axis.set(title="latency distribution (log scales)", xlabel="percentile", ylabel="latency")
    latency = result.get("latency_us")
    record = result.get("latency_histogram")
    if not latency or not record:
        axis.text(0.5, 0.5, "no operation completed: no latency", ha="center",
                  transform=axis.transAxes)  # fmt: skip
        axis.set_xticks([])
        axis.set_yticks([])
        return
    from matplotlib.ticker import FuncFormatter

    histogram = Histogram.from_json(record)
    top = latency["max"]
    points = [
        (1 / (1 - level / 100), min(histogram.highest_equivalent(index) / 1000, top))
        for index, level, _ in percentile_steps(histogram)
        if level < 100
    ]
    axis.plot([x for x, _ in points], [y for _, y in points], color="C0", drawstyle="steps-post")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xticks([10**n for n in range(len(_NINES))], _NINES)
    axis.set_xlim(1, min(max(100, points[-1][0] * 2), 10 ** len(_NINES)))
    for key in _LABELLED:
        x = 1 / (1 - float(key[1:]) / 100)
        axis.plot([x], [latency[key]], "o", color="C0")
        # Below and right of its point, where the curve, which only rises, is not; p50's
        # above, clear of p90's (the two are often close).
        above = key == "p50"
        axis.annotate(f"{key} {_us(latency[key])}", (x, latency[key]), textcoords="offset points",
                      xytext=(2, 6) if above else (6, -4), ha="left",
                      va="bottom" if above else "top", fontsize="small")  # fmt: skip
    axis.axhline(top, color="C3", linestyle="--", linewidth=1)
    axis.annotate(f"max {_us(top)}", (1, top), xycoords=("axes fraction", "data"),
                  textcoords="offset points", xytext=(-4, 3), ha="right", va="bottom",
                  color="C3", fontsize="small")  # fmt: skip
    axis.set_ylim(top=top * 1.6)
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: _us(value)))
    # Between the powers of ten, label 2 and 5 only.
    axis.yaxis.set_minor_formatter(
        FuncFormatter(lambda value, _: _us(value) if f"{value:e}"[0] in "25" else "")
    )
    axis.tick_params(axis="y", which="minor", labelsize="x-small")
