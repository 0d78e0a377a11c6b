"""``bench merge``: one result from the runs of several load machines against one server.

Counts add up; latency histograms merge bucket by bucket (never an average of
percentiles), so the merged percentiles are those of every operation of every run.

Throughput is the operations of all runs divided by the span of their windows, from the
earliest start to the latest end on the wall clock. When the load machines ran at the
same time (the case this is for) that is the sum of their rates, which is what the
server did under all of them; when they did not, it never claims more than the server
did in the span, and the result warns that the windows overlap for only part of it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from netframe.bench._figures import COUNTERS, TIMELINES, figures
from netframe.bench._histogram import Histogram, HistogramError
from netframe.bench._options import BenchError
from netframe.bench._run import environment

__all__ = ["MIN_OVERLAP", "load_result", "merge_results"]

#: Below this share of their span in common, the runs' windows were not simultaneous.
MIN_OVERLAP: Final = 0.9
_STEPS_PER_S: Final = 10  # timelines are in 100 ms steps
#: The options that must agree for runs to be one measurement.
_SAME_OPTIONS: Final = ("target", "framing")


def load_result(path: Path) -> dict[str, Any]:
    """A bench result read from the ``--json`` file at ``path``.

    Raises:
        BenchError: it cannot be read, is not JSON or is not a bench result.
    """
    try:
        result = json.loads(path.read_text())
    except OSError as exc:
        raise BenchError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path} is not JSON: {exc}") from None
    if not isinstance(result, dict) or not {"scenario", "ops", "options"} <= result.keys():
        raise BenchError(f"{path} is not the --json of a netframe bench run")
    return result


def _check(results: Sequence[dict[str, Any]], sources: Sequence[str]) -> list[Histogram]:
    """The runs' histograms, once every run is known to belong with the first."""
    first = results[0]
    same = _SAME_OPTIONS + (("size",) if first["scenario"] in ("echo", "udp") else ())
    histograms = []
    for result, source in zip(results, sources, strict=True):
        if result["scenario"] != first["scenario"]:
            raise BenchError(
                f"cannot merge runs of different scenarios: {first['scenario']} "
                f"({sources[0]}) and {result['scenario']} ({source})"
            )
        for option in same:
            mine, theirs = result["options"].get(option), first["options"].get(option)
            if mine != theirs:
                raise BenchError(
                    f"cannot merge runs with different {option}: {theirs} ({sources[0]}) "
                    f"and {mine} ({source})"
                )
        if not result.get("latency_histogram"):
            raise BenchError(
                f"{source} has no latency histogram (a hold run, or a netframe from before "
                "histograms): nothing to merge"
            )
        if not isinstance(result.get("window_start_unix_s"), int | float):
            raise BenchError(f"{source} does not say when its window began: nothing to merge")
        try:
            histograms.append(Histogram.from_json(result["latency_histogram"]))
        except HistogramError as exc:
            raise BenchError(f"{source}: {exc}") from None
    return histograms


def _aligned(results: Sequence[dict[str, Any]], key: str, first_start: float) -> list[int]:
    """The runs' per-second timelines under ``key`` added step by step on the wall clock,
    as counts per 100 ms step."""
    total: list[int] = []
    for result in results:
        steps = result.get(key) or []
        offset = round((result["window_start_unix_s"] - first_start) * _STEPS_PER_S)
        total.extend([0] * max(0, offset + len(steps) - len(total)))
        for i, per_s in enumerate(steps):
            total[offset + i] += round(per_s / _STEPS_PER_S)
    return total


def merge_results(results: Sequence[dict[str, Any]], sources: Sequence[str]) -> dict[str, Any]:
    """One result from the runs ``results`` (read from ``sources``, named in errors).

    Raises:
        BenchError: no runs, runs of different scenarios, targets, framings or sizes, or a
            run without a latency histogram or a window time.
    """
    if not results:
        raise BenchError("nothing to merge")
    histograms = _check(results, sources)
    starts = [float(r["window_start_unix_s"]) for r in results]
    ends = [start + float(r["window_s"]) for start, r in zip(starts, results, strict=True)]
    span = max(ends) - min(starts)
    overlap = max(0.0, min(ends) - max(starts)) / span
    counts = {name: sum(r.get(name) or 0 for r in results) for name in COUNTERS}
    first_error = next((r["first_error"] for r in results if r.get("first_error")), None)
    timelines = {name: _aligned(results, key, min(starts)) for name, key in TIMELINES.items()}
    first = results[0]
    merged = figures(
        first["scenario"],
        first["options"].get("size", 0),
        counts,
        first_error,
        Histogram.merged(histograms),
        span,
        timelines,
    )
    merged["window_s"] = span
    merged["window_start_unix_s"] = min(starts)
    merged["server"] = {}  # each load machine saw the server only in part; see "runs"
    merged["options"] = {
        **{key: first["options"].get(key) for key in ("scenario", "target", "framing", "size")},
        "conns": sum(r["options"].get("conns", 0) for r in results),
        "workers": sum(r["options"].get("workers", 0) for r in results),
        "duration_s": span,
    }
    merged["merged"] = {
        "runs": [
            {
                "source": source,
                "ops": r["ops"],
                "ops_per_s": r["ops_per_s"],
                "errors": r["errors"],
                "window_start_unix_s": r["window_start_unix_s"],
                "window_s": r["window_s"],
                "partial": bool(r.get("partial")),
                "conns": r["options"].get("conns"),
                "server": r.get("server"),
                "environment": r.get("environment"),
            }
            for source, r in zip(sources, results, strict=True)
        ],
        "throughput_rule": "all operations / span of the windows (earliest start to latest end)",
        "overlap": overlap,
    }
    if overlap < MIN_OVERLAP:
        merged["merged"]["warning"] = (
            f"the windows overlap for {overlap:.0%} of their {span:.1f} s span: the "
            "throughput is averaged over the span, below what the server did while all "
            "ran; start the load machines together"
        )
    merged["environment"] = environment()
    return merged
