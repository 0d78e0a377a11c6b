"""The ``.hgrm`` text: a histogram's percentile distribution as wrk2 and memtier print it.

This is the form of HdrHistogram's ``outputPercentileDistribution`` (and of the C
library's ``hdr_percentiles_print``, which wrk2 and memtier_benchmark call): a header
line, then one line per reporting step with the value, the percentile (0 to 1), the
count of values up to it and 1/(1-percentile), then three footer lines with the mean,
the standard deviation, the maximum, the total count and the histogram's layout. Tools
that plot ``.hgrm`` files (HdrHistogram's plotter, hdr-plot) read it as they read
wrk2's.

The reporting steps are HdrHistogram's: ``ticks_per_half_distance`` steps (5, as
wrk2) between 0% and 50%, as many between 50% and 75%, then 75% and 87.5%, and so on,
each half of the remaining distance to 100%, until the largest value; the last line is
at 100%. Values print in milliseconds with as many decimals as the histogram has
significant digits (three: microseconds), as HdrHistogram prints them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Final

from netframe.bench._histogram import Histogram

__all__ = ["NS_PER_MS", "percentile_distribution", "percentile_steps"]

#: The histogram's nanoseconds per millisecond, the unit of the ``.hgrm`` values.
NS_PER_MS: Final = 1_000_000
TICKS_PER_HALF_DISTANCE: Final = 5


def percentile_steps(
    histogram: Histogram, ticks_per_half_distance: int = TICKS_PER_HALF_DISTANCE
) -> Iterator[tuple[int, float, int]]:
    """(bucket index, percentile level, count up to it) of each reporting line; the
    last is at 100%. Nothing for an empty histogram."""
    total = histogram.total
    level = 0.0
    cumulative = 0
    for index, count in histogram.recorded():
        cumulative += count
        reached = 100.0 * cumulative / total
        while reached >= level:
            yield index, level, cumulative
            if cumulative == total:
                yield index, 100.0, cumulative  # the last line, at 100%
                return
            # The next level: ticks_per_half_distance steps in each halving of the
            # distance left to 100% (log(x) / log(2), as HdrHistogram's Java and C code).
            halvings = math.floor(math.log(100.0 / (100.0 - level)) / math.log(2))
            level += 100.0 / (ticks_per_half_distance * 2 ** (halvings + 1))
            if level >= 100.0:  # only where floating point runs out of room
                break


def percentile_distribution(
    histogram: Histogram,
    unit_scale: float = NS_PER_MS,
    ticks_per_half_distance: int = TICKS_PER_HALF_DISTANCE,
) -> str:
    """The ``.hgrm`` text of ``histogram``, each value divided by ``unit_scale``.

    An empty histogram gives the header and the footer with zeros, as HdrHistogram's.
    """
    digits = histogram.significant_digits
    lines = [f"{'Value':>12} {'Percentile':>14} {'TotalCount':>10} {'1/(1-Percentile)':>14}", ""]
    if histogram.total:
        for index, level, cumulative in percentile_steps(histogram, ticks_per_half_distance):
            value = histogram.highest_equivalent(index) / unit_scale
            fraction = level / 100.0
            line = f"{value:12.{digits}f} {fraction:2.12f} {cumulative:10d}"
            if level != 100.0:
                line += f" {1.0 / (1.0 - fraction):14.2f}"
            lines.append(line)
    mean, deviation = histogram.mean_and_stddev()
    top = histogram.max
    largest = 0 if not top else histogram.highest_equivalent(histogram.index_of(top))
    lines += [
        f"#[Mean    = {mean / unit_scale:12.{digits}f}, "
        f"StdDeviation   = {deviation / unit_scale:12.{digits}f}]",
        f"#[Max     = {largest / unit_scale:12.{digits}f}, Total count    = {histogram.total:12d}]",
        f"#[Buckets = {histogram.bucket_count:12d}, "
        f"SubBuckets     = {histogram.sub_bucket_count:12d}]",
    ]
    return "\n".join(lines) + "\n"
