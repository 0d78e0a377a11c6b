"""The load generator's latency histograms.

The histogram tests are pure: known values, and hypothesis properties against exact
percentiles computed from the sorted values.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netframe.bench._figures import latency_us
from netframe.bench._histogram import (
    HIGHEST_NS,
    Histogram,
    HistogramError,
    _get_varint,
    _put_varint,
)

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
