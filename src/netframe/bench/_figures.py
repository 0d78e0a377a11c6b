"""The figures of a result, from counts, a latency histogram and a window: one recipe for a
run (its load processes' tallies) and for a merge (several runs' results).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from netframe.bench._histogram import Histogram

__all__ = ["COUNTERS", "PERCENTILES", "TIMELINES", "figures", "latency_us"]

PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)
#: What adds up across load processes and across runs.
COUNTERS: Final = (
    "ops", "errors", "connect_errors", "lost", "bytes_in", "bytes_out", "client_cpu_s",
)  # fmt: skip
#: Per-100 ms counts in the window, by name: each is reported per second.
TIMELINES: Final = {
    "timeline": "timeline_ops_per_s",
    "error_timeline": "timeline_errors_per_s",
    "lost_timeline": "timeline_lost_per_s",
}
_STEPS_PER_S: Final = 10  # the timelines count in 100 ms steps


def latency_us(histogram: Histogram) -> dict[str, float]:
    """Percentiles, and the exact minimum, maximum and mean, in microseconds, of a
    histogram of nanoseconds. A percentile is HdrHistogram's (the largest value of the
    bucket it falls in: at most 0.1% above the true one) but never above the exact
    maximum, which the top bucket's largest value may pass."""
    top = histogram.max or 0
    values = histogram.values_at_percentiles(PERCENTILES)
    figures = {f"p{p:g}": min(v, top) / 1000 for p, v in zip(PERCENTILES, values, strict=True)}
    figures["min"] = (histogram.min or 0) / 1000
    figures["max"] = (histogram.max or 0) / 1000
    figures["mean"] = histogram.sum / histogram.total / 1000
    return figures


def figures(
    scenario: str,
    size: int,
    counts: Mapping[str, int | float],
    first_error: str | None,
    histogram: Histogram,
    window_s: float,
    timelines: Mapping[str, Sequence[int]],
) -> dict[str, Any]:
    """The result's figures: totals, rates over ``window_s`` seconds, latency.

    ``counts`` holds every name of :data:`COUNTERS`; ``timelines`` each of
    :data:`TIMELINES`, in 100 ms steps.
    """
    ops = int(counts["ops"])
    result: dict[str, Any] = {
        "scenario": scenario,
        "ops": ops,
        "ops_per_s": ops / window_s,
        "errors": int(counts["errors"]),
        "first_error": first_error,
        "connect_errors": int(counts["connect_errors"]),
        "bytes_in": int(counts["bytes_in"]),
        "bytes_out": int(counts["bytes_out"]),
        "client_cpu_s": float(counts["client_cpu_s"]),
        "client_cpu_pct": float(counts["client_cpu_s"]) / window_s * 100,
    }
    for name, key in TIMELINES.items():
        if name != "lost_timeline" or scenario == "udp":
            result[key] = [n * _STEPS_PER_S for n in timelines[name]]
    if scenario == "echo":
        result["mib_per_s"] = ops * size / window_s / 2**20
    if scenario == "udp":
        lost = int(counts["lost"])
        result["lost"] = lost
        result["loss_ratio"] = lost / (ops + lost) if ops + lost else 0.0
    result["latency_histogram"] = histogram.to_json()
    if histogram.total:
        result["latency_us"] = latency_us(histogram)
        result["latency_samples"] = histogram.total
    return result
