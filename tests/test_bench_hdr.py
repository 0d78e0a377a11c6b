"""The load generator's latency histograms, its ``.hgrm`` files, ``bench merge`` and plots.

The histogram tests are pure (known values, and hypothesis properties against exact
percentiles computed from the sorted values); the rest run the real command line
against real servers on loopback, short and bounded, and never look at a speed.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CliServer, assert_one_line_error, run_netframe, udp_responder
from hypothesis import given, settings
from hypothesis import strategies as st

from netframe.bench import BenchOptions, run_bench
from netframe.bench._figures import latency_us
from netframe.bench._hgrm import percentile_distribution
from netframe.bench._histogram import (
    HIGHEST_NS,
    Histogram,
    HistogramError,
    _get_varint,
    _put_varint,
)
from netframe.bench._merge import merge_results
from netframe.bench._plot import plot
from netframe.config import Address

HANG_GUARD_S = 60.0
#: A bucket never spans more than this share of the values it holds (3 digits).
PRECISION = 1 / 1024


def histogram_of(values: list[int]) -> Histogram:
    histogram = Histogram()
    histogram.record(np.array(values, dtype=np.int64))
    return histogram


def nearest_rank(values: list[int], percentile: float) -> int:
    """The exact percentile: the smallest value with ``percentile``% of all at or below."""
    ordered = sorted(values)
    rank = max(1, math.ceil(round(percentile * len(ordered) / 100, 7)))
    return ordered[rank - 1]


# -- the histogram ----------------------------------------------------------------------


def test_counts_are_exact_and_small_values_keep_their_own_bucket() -> None:
    values = [0, 1, 1, 2, 5, 5, 5, 2047]
    histogram = histogram_of(values)
    assert histogram.total == len(values)
    assert (histogram.min, histogram.max, histogram.sum) == (0, 2047, sum(values))
    counted = {histogram.lowest_equivalent(i): n for i, n in histogram.recorded()}
    assert counted == {0: 1, 1: 2, 2: 1, 5: 3, 2047: 1}
    for value in values:  # below 2,048 a bucket holds one value
        index = histogram.index_of(value)
        assert histogram.lowest_equivalent(index) == histogram.highest_equivalent(index) == value


def test_percentiles_of_known_values() -> None:
    histogram = histogram_of(list(range(1, 101)))  # 1 to 100, all exact
    assert histogram.values_at_percentiles([0, 1, 50, 90, 99, 99.9, 100]) == [
        1, 1, 50, 90, 99, 100, 100,
    ]  # fmt: skip
    wide = histogram_of([1_000_000] * 999 + [5_000_000])
    p50, p999, p100 = wide.values_at_percentiles([50, 99.9, 100])
    assert 1_000_000 <= p50 <= 1_000_000 * (1 + PRECISION)
    assert p999 == p50  # rank 999 of 1,000
    assert 5_000_000 <= p100 <= 5_000_000 * (1 + PRECISION)
    assert Histogram().values_at_percentiles([50]) == [0]


def test_out_of_range_values_are_counted_at_the_edges() -> None:
    histogram = histogram_of([-5, HIGHEST_NS * 10])
    assert histogram.total == 2
    assert (histogram.min, histogram.max) == (0, HIGHEST_NS)


def test_latency_figures_never_pass_the_exact_maximum() -> None:
    histogram = histogram_of([20_000] * 10 + [280_557])  # the top bucket reaches 280,575
    figures = latency_us(histogram)
    assert figures["max"] == 280.557
    assert figures["p99.9"] == 280.557
    assert figures["p50"] == 20.015  # the largest value of the bucket of 20,000 (16 wide)
    assert figures["mean"] == pytest.approx((20_000 * 10 + 280_557) / 11 / 1000)


latencies = st.lists(st.integers(min_value=0, max_value=HIGHEST_NS), min_size=1, max_size=300)


@settings(max_examples=150, deadline=None)
@given(latencies, st.floats(min_value=0, max_value=100))
def test_a_percentile_is_within_the_stated_precision(values: list[int], percentile: float) -> None:
    exact = nearest_rank(values, percentile)
    found = histogram_of(values).value_at_percentile(percentile)
    if percentile == 0:  # the lowest value of the smallest value's bucket
        assert exact - exact * PRECISION <= found <= exact
    else:  # the highest value of the bucket of the exact one
        assert exact <= found <= exact + exact * PRECISION


@settings(max_examples=150, deadline=None)
@given(latencies, latencies)
def test_merging_two_histograms_is_the_histogram_of_the_union(
    first: list[int], second: list[int]
) -> None:
    merged = Histogram.merged([histogram_of(first), histogram_of(second)])
    assert merged == histogram_of(first + second)
    assert merged.total == len(first) + len(second)


@settings(max_examples=100, deadline=None)
@given(latencies)
def test_the_encoding_keeps_every_count(values: list[int]) -> None:
    histogram = histogram_of(values)
    encoded = histogram.encode()
    assert encoded.startswith("HISTFAAA")
    decoded = Histogram.decode(encoded)
    assert np.array_equal(decoded.counts, histogram.counts)
    assert decoded.total == histogram.total
    back = Histogram.from_json(json.loads(json.dumps(histogram.to_json())))
    assert back == histogram  # the JSON record keeps the exact extremes and sum too


@pytest.mark.parametrize(
    "value", [0, 1, -1, 63, -64, 64, 2**55, -(2**55), 2**56, 2**62, 2**63 - 1, -(2**63)]
)
def test_varints_of_every_length_round_trip(value: int) -> None:
    out = bytearray()
    _put_varint(out, value)
    assert len(out) <= 9
    assert _get_varint(bytes(out) + b"\x99", 0) == (value, len(out))


def test_hdrhistogram_itself_reads_our_encoding_and_we_read_its() -> None:
    hdrh = pytest.importorskip("hdrh.histogram")
    values = [int(v) for v in np.random.default_rng(7).lognormal(11, 1.5, 5000)] + [0, 2048]
    ours = histogram_of(values)
    theirs = hdrh.HdrHistogram(1, HIGHEST_NS, 3)
    for value in values:
        theirs.record_value(value)
    percentiles = [0, 10, 50, 90, 99, 99.9, 100]
    decoded = hdrh.HdrHistogram.decode(ours.encode())
    assert decoded.get_total_count() == len(values)
    expected = [theirs.get_value_at_percentile(p) for p in percentiles]
    assert [decoded.get_value_at_percentile(p) for p in percentiles] == expected
    assert ours.values_at_percentiles(percentiles) == expected
    encoded = theirs.encode()
    read = Histogram.decode(encoded.decode() if isinstance(encoded, bytes) else encoded)
    assert np.array_equal(read.counts, ours.counts)


@pytest.mark.parametrize(
    "text", ["not base64!", "SElTVA==", Histogram().encode()[:30], histogram_of([5]).encode()[:-8]]
)
def test_a_damaged_encoding_is_a_histogram_error(text: str) -> None:
    with pytest.raises(HistogramError):
        Histogram.decode(text)


# -- the .hgrm text ---------------------------------------------------------------------

HGRM_LINE = re.compile(r"^\s*([\d.]+)\s+([\d.]+)\s+(\d+)(?:\s+([\d.]+))?$")
HGRM_FOOTER = re.compile(
    r"#\[Mean\s+=\s+([\d.]+), StdDeviation\s+=\s+([\d.]+)\]\n"
    r"#\[Max\s+=\s+([\d.]+), Total count\s+=\s+(\d+)\]\n"
    r"#\[Buckets\s+=\s+(\d+), SubBuckets\s+=\s+(\d+)\]\n$"
)


def parse_hgrm(text: str) -> tuple[list[tuple[float, float, int]], dict[str, float]]:
    """(value, percentile, total count) of each line, and the footer's figures."""
    header, blank, *body = text.splitlines(keepends=True)
    assert header.split() == ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
    assert blank == "\n"
    footer = HGRM_FOOTER.search(text)
    assert footer, text[-300:]
    rows = []
    for line in body:
        if line.startswith("#"):
            break
        match = HGRM_LINE.match(line.rstrip("\n"))
        assert match, line
        value, percentile, count, inverse = match.groups()
        rows.append((float(value), float(percentile), int(count)))
        if inverse is not None:
            assert float(inverse) == pytest.approx(1 / (1 - float(percentile)), abs=0.01)
    names = ("mean", "stddev", "max", "total", "buckets", "sub_buckets")
    return rows, {name: float(v) for name, v in zip(names, footer.groups(), strict=True)}


def test_hgrm_steps_halve_the_distance_to_100_percent() -> None:
    values = [1_000 * n for n in range(1, 10_001)]  # 1 us to 10 ms
    rows, footer = parse_hgrm(percentile_distribution(histogram_of(values)))
    levels = [percentile for _, percentile, _ in rows]
    assert levels[:12] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.775]
    assert levels[-1] == 1.0
    assert levels == sorted(levels)
    assert [v for v, _, _ in rows] == sorted(v for v, _, _ in rows)
    assert rows[-1][2] == footer["total"] == 10_000
    assert rows[0][0] == 0.001  # the smallest value, in milliseconds
    assert rows[-1][0] == footer["max"] == pytest.approx(10.0, rel=PRECISION)
    assert footer["mean"] == pytest.approx(5.0, rel=0.01)
    assert (footer["buckets"], footer["sub_buckets"]) == (32, 2048)
    cumulative = set(np.cumsum(histogram_of(values).counts).tolist())
    for _, percentile, count in rows:  # each line's count is all values up to a bucket
        assert count in cumulative
        assert count / 10_000 >= percentile


def test_an_empty_hgrm_has_its_header_and_footer() -> None:
    rows, footer = parse_hgrm(percentile_distribution(Histogram()))
    assert rows == []
    assert footer["total"] == 0


# -- real runs -------------------------------------------------------------------------


def run_json(*args: str, tmp: Path, name: str) -> dict[str, Any]:
    """``bench ARGS --json`` (one load process, a short window); its result."""
    path = tmp / f"{name}.json"
    done = run_netframe(
        "bench", *args, "--workers", "1", "--duration", "1", "--warmup", "0.2",
        "--no-progress", "--json", str(path),
    )  # fmt: skip
    assert done.returncode == 0, done
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def test_hdr_file_of_a_run_counts_every_operation(tmp_path: Path, loop_name: str) -> None:
    hgrm = tmp_path / "run.hgrm"
    result = run_json(
        "--spawn", "--spawn-args", f"--loop {loop_name}", "--scenario", "echo", "--size", "64",
        "--conns", "2", "--hdr", str(hgrm), tmp=tmp_path, name="run",
    )  # fmt: skip
    rows, footer = parse_hgrm(hgrm.read_text())
    assert result["ops"] > 0
    assert footer["total"] == rows[-1][2] == result["ops"] == result["latency_samples"]
    record = result["latency_histogram"]
    assert record["total_count"] == result["ops"]
    assert record["unit"] == "ns"
    median = next(value for value, percentile, _ in rows if percentile >= 0.5)
    assert median == pytest.approx(result["latency_us"]["p50"] / 1000, abs=0.0006)
    # The footer gives the highest value of the exact maximum's bucket (up to one
    # bucket, a 1/1024 of the value, above it), printed to the microsecond.
    top = result["latency_us"]["max"] / 1000
    assert top - 0.0005 <= footer["max"] <= top * (1 + PRECISION) + 0.0005


def test_hdr_is_refused_for_hold(tmp_path: Path) -> None:
    done = run_netframe("bench", "--spawn", "--scenario", "hold", "--hdr", str(tmp_path / "x"))
    assert_one_line_error(done, 2, "--hdr writes a latency distribution, which hold does not")


def bench_at_once(target: str, tmp: Path, names: list[str], conns: list[int]) -> list[Path]:
    """Several ``bench --target`` processes at the same time (as from several load
    machines); the paths of their JSON files."""
    procs, paths = [], []
    for name, count in zip(names, conns, strict=True):
        path = tmp / f"{name}.json"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "netframe", "bench", "--target", target, "--scenario",
             "echo", "--size", "100", "--conns", str(count), "--workers", "1",
             "--duration", "1", "--warmup", "0.3", "--no-progress", "--json", str(path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
        paths.append(path)
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=HANG_GUARD_S)
            assert proc.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return paths


@pytest.fixture
def echo_server(cli_server: Callable[..., CliServer]) -> str:
    server = cli_server(
        "--tcp", "127.0.0.1:0", "--handler", "echo", "--framing", "raw", "--log-level", "warning"
    )
    host, port = server.address("tcp")
    return f"{host}:{port}"


def test_merge_of_two_simultaneous_runs_adds_counts_and_merges_histograms(
    tmp_path: Path, echo_server: str
) -> None:
    paths = bench_at_once(echo_server, tmp_path, ["a", "b"], [2, 3])
    merged_json, merged_hgrm, merged_png = (tmp_path / f"m.{e}" for e in ("json", "hgrm", "png"))
    done = run_netframe(
        "bench", "merge", *map(str, paths),
        "--json", str(merged_json), "--hdr", str(merged_hgrm), "--plot", str(merged_png),
    )  # fmt: skip
    assert done.returncode == 0, done
    assert "Traceback" not in done.stderr
    assert re.search(r"merged .*2 runs", done.stdout), done.stdout
    a, b = (json.loads(path.read_text()) for path in paths)
    merged = json.loads(merged_json.read_text())
    for key in ("ops", "errors", "bytes_in", "bytes_out", "connect_errors"):
        assert merged[key] == a[key] + b[key], key
    assert merged["ops"] > 0
    assert merged["options"]["conns"] == 5
    both = Histogram.merged(Histogram.from_json(r["latency_histogram"]) for r in (a, b))
    assert Histogram.from_json(merged["latency_histogram"]) == both
    assert merged["latency_us"] == latency_us(both)  # from the merged histogram
    assert merged["latency_us"]["max"] == max(a["latency_us"]["max"], b["latency_us"]["max"])
    assert merged["window_s"] >= max(a["window_s"], b["window_s"])
    assert merged["ops_per_s"] == merged["ops"] / merged["window_s"]
    assert sum(merged["timeline_ops_per_s"]) == sum(a["timeline_ops_per_s"]) + sum(
        b["timeline_ops_per_s"]
    )
    _, footer = parse_hgrm(merged_hgrm.read_text())
    assert footer["total"] == merged["ops"]
    assert merged_png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def greet_udp_dropping_every_fifth(count: int, data: bytes) -> bytes | None:
    return None if count % 5 == 0 else b"Hello, " + data + b"!"


@pytest.fixture
def lossy_udp_results() -> list[dict[str, Any]]:
    """Two udp runs one after the other against a responder that drops every 5th datagram
    and answers some wrongly."""

    def reply(count: int, data: bytes) -> bytes | None:
        if count % 97 == 0:
            return b"Hi, " + data + b"!"
        return greet_udp_dropping_every_fifth(count, data)

    with udp_responder(reply) as target:
        options = BenchOptions(
            scenario="udp", target=Address(target.host, target.port), conns=2, workers=1,
            duration_s=0.6, warmup_s=0.1, udp_timeout_s=0.05,
        )  # fmt: skip
        began = time.monotonic()
        results = [run_bench(options), run_bench(options)]
        assert time.monotonic() - began < HANG_GUARD_S
    return results


def test_merge_of_runs_not_at_the_same_time_warns_and_counts_loss(
    lossy_udp_results: list[dict[str, Any]], tmp_path: Path
) -> None:
    first, second = lossy_udp_results
    merged = merge_results([first, second], ["first.json", "second.json"])
    assert merged["lost"] == first["lost"] + second["lost"] > 0
    assert merged["errors"] == first["errors"] + second["errors"] > 0
    assert merged["loss_ratio"] == merged["lost"] / (merged["ops"] + merged["lost"])
    # One after the other: the span is about both windows, and the rate is over all of it.
    assert merged["window_s"] >= first["window_s"] + second["window_s"]
    assert merged["ops_per_s"] < first["ops_per_s"] + second["ops_per_s"]
    assert "warning" in merged["merged"]
    assert "overlap" in merged["merged"]["warning"]
    # The plot shows the errors and the loss (drawn headless; its pixels are not checked).
    for result, name in ((first, "run"), (merged, "merged")):
        path = tmp_path / f"{name}.png"
        plot(result, path)
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.fixture(scope="module")
def one_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real greeting run's --json, to make bad merge inputs from."""
    return run_json(
        "--spawn", "--scenario", "greeting", "--conns", "2",
        tmp=tmp_path_factory.mktemp("run"), name="run",
    )  # fmt: skip


def _changed(result: dict[str, Any], change: str) -> Any:
    changed = json.loads(json.dumps(result))
    if change == "scenario":
        changed["scenario"] = "echo"
    elif change == "target":
        changed["options"]["target"] = "127.0.0.2:1"
    elif change == "histogram":
        del changed["latency_histogram"]
    elif change == "counts":
        changed["latency_histogram"]["total_count"] += 1
    elif change == "not-a-run":
        changed = {"hello": 1}
    return changed


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ("scenario", "cannot merge runs of different scenarios"),
        ("target", "cannot merge runs with different target"),
        ("histogram", "has no latency histogram"),
        ("counts", "its record says"),
        ("not-a-run", "is not the --json of a netframe bench run"),
        ("not-json", "is not JSON"),
        ("missing", "cannot read"),
    ],
)
def test_bad_merge_inputs_are_one_line_and_exit_2(
    one_run: dict[str, Any], tmp_path: Path, change: str, text: str
) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(one_run))
    if change == "not-json":
        bad.write_text("{not json")
    elif change != "missing":
        bad.write_text(json.dumps(_changed(one_run, change)))
    assert_one_line_error(run_netframe("bench", "merge", str(good), str(bad)), 2, text)


def test_merge_needs_at_least_one_file() -> None:
    assert_one_line_error(run_netframe("bench", "merge"), 2, "the following arguments are required")
