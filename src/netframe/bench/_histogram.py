"""Latency histograms in HdrHistogram's layout: exact counts, fixed relative precision.

A :class:`Histogram` counts integer values (the load generator records nanoseconds) in
buckets whose width grows with the value, the layout of Gil Tene's HdrHistogram: with
3 significant digits, every value below 2,048 has a bucket of its own, and above that a
bucket is never wider than 1/1,024 of the values it holds (under 0.1%). Counts are exact:
every value recorded is counted once, none is sampled away. Two histograms of the same
layout merge by adding their counts, so the histogram of several load processes (or of
several load machines) is exactly the one a single recorder of all their values would
have made, and its percentiles are those of all the values together, never an average
of percentiles.

Values are recorded in batches (:meth:`Histogram.record`, a numpy array), which costs a
few nanoseconds a value; the load processes buffer their latencies and record them every
few thousand operations.

The interchange form is HdrHistogram's own "V2 compressed" encoding in base64 (the
``HISTFAAA...`` strings of HdrHistogram's logs), which HdrHistogram's libraries in Java,
C, Go, Python and others decode; :meth:`Histogram.encode` and :meth:`Histogram.decode`
write and read it.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "HIGHEST_NS",
    "SIGNIFICANT_DIGITS",
    "Histogram",
    "HistogramError",
]

#: Decimal digits every value keeps: 3 means within 0.1% (exact below 2,048).
SIGNIFICANT_DIGITS: Final = 3
#: The largest latency the load generator tracks, in nanoseconds: one hour. A latency
#: above it (a server stalled for longer than a run is long) is counted as one hour.
HIGHEST_NS: Final = 3_600 * 1_000_000_000

# HdrHistogram's V2 encoding: a big-endian header, then the counts as ZigZag LEB128
# varints (at most 9 bytes each) where a negative number -n stands for n empty buckets;
# the whole payload deflated behind a second header. The cookies' 0x10 bit marks it.
_PAYLOAD_COOKIE: Final = 0x1C849303 | 0x10
_COMPRESSED_COOKIE: Final = 0x1C849304 | 0x10
_COOKIE_BASE_MASK: Final = ~0xF0
# cookie, counts' length, index offset, digits, lowest, highest, conversion ratio
_PAYLOAD_HEADER: Final = struct.Struct(">iiiiqqd")
# cookie, length of the deflated payload
_COMPRESSED_HEADER: Final = struct.Struct(">ii")
#: A decoded histogram may not claim more buckets than this (a hostile file's guard).
_MAX_COUNTS: Final = 1 << 22
_MAX_PAYLOAD: Final = 64 + 9 * _MAX_COUNTS


class HistogramError(ValueError):
    """A histogram cannot be decoded or merged; the message says why in one line."""


class Histogram:
    """Counts of integer values from 0 to ``highest``, to ``significant_digits`` digits.

    Args:
        highest: the largest value tracked; larger values are counted as ``highest``.
        significant_digits: 1 to 5; each value is kept to this many decimal digits.
        lowest: the smallest value told apart from 0 (HdrHistogram's "lowest discernible
            value"), rounded down to a power of two; 1 keeps small values exact.

    Raises:
        HistogramError: a parameter is out of range.
    """

    __slots__ = (
        "_half_count",
        "_half_magnitude",
        "_mask",
        "_unit_magnitude",
        "counts",
        "highest",
        "lowest",
        "max",
        "min",
        "significant_digits",
        "sum",
        "total",
    )

    def __init__(
        self,
        highest: int = HIGHEST_NS,
        significant_digits: int = SIGNIFICANT_DIGITS,
        lowest: int = 1,
    ) -> None:
        if not 1 <= significant_digits <= 5:
            raise HistogramError(f"significant digits must be 1 to 5, not {significant_digits}")
        if lowest < 1 or highest < 2 * lowest or highest >= 1 << 53:
            raise HistogramError(f"cannot track values from {lowest} to {highest}")
        self.lowest = lowest
        self.highest = highest
        self.significant_digits = significant_digits
        self._unit_magnitude = lowest.bit_length() - 1
        # The smallest power of two that holds 2 * 10**digits values one unit apart.
        sub_bucket_count = 1 << math.ceil(math.log2(2 * 10**significant_digits))
        self._half_magnitude = sub_bucket_count.bit_length() - 2
        self._half_count = sub_bucket_count // 2
        self._mask = (sub_bucket_count - 1) << self._unit_magnitude
        # One more bucket of half_count entries per doubling past the first buckets.
        buckets, reach = 1, sub_bucket_count << self._unit_magnitude
        while reach <= highest:
            reach <<= 1
            buckets += 1
        self.counts: npt.NDArray[np.int64] = np.zeros(
            (buckets + 1) * self._half_count, dtype=np.int64
        )
        self.total = 0
        self.min: int | None = None
        self.max: int | None = None
        self.sum = 0

    # -- recording -----------------------------------------------------------------------

    def _indexes(self, values: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The bucket index of each value (0 <= value <= highest)."""
        # The position of the highest bit set, exact as a float below 2**53.
        _, bits = np.frexp((values | self._mask).astype(np.float64))
        bucket = bits.astype(np.int64) - (self._unit_magnitude + self._half_magnitude + 1)
        sub_bucket = values >> (bucket + self._unit_magnitude)
        return ((bucket + 1) << self._half_magnitude) + sub_bucket - self._half_count

    def record(self, values: npt.ArrayLike) -> None:
        """Count each of ``values`` (integers; negatives count as 0, values above
        :attr:`highest` as :attr:`highest`)."""
        array = np.clip(np.asarray(values, dtype=np.int64), 0, self.highest)
        if not array.size:
            return
        self.counts += np.bincount(self._indexes(array), minlength=self.counts.size)
        low, high = int(array.min()), int(array.max())
        self.min = low if self.min is None else min(self.min, low)
        self.max = high if self.max is None else max(self.max, high)
        self.total += int(array.size)
        self.sum += int(array.sum())

    def add(self, other: Histogram) -> None:
        """Add ``other``'s counts to this histogram's: the merge of the two.

        Raises:
            HistogramError: the two do not share a layout (significant digits and lowest
                value); a wider one merges into a narrower one only while its values fit.
        """
        if (other.significant_digits, other.lowest) != (self.significant_digits, self.lowest):
            raise HistogramError(
                f"cannot merge a histogram of {other.significant_digits} digits from "
                f"{other.lowest} into one of {self.significant_digits} digits from {self.lowest}"
            )
        used = _used_length(other.counts)
        if used > self.counts.size:
            raise HistogramError(
                f"a histogram holding values up to {other.max} does not fit one tracking "
                f"values up to {self.highest}"
            )
        self.counts[:used] += other.counts[:used]
        self.total += other.total
        self.sum += other.sum
        if other.min is not None:
            self.min = other.min if self.min is None else min(self.min, other.min)
        if other.max is not None:
            self.max = other.max if self.max is None else max(self.max, other.max)

    @classmethod
    def merged(cls, histograms: Iterable[Histogram]) -> Histogram:
        """One histogram with the counts of all ``histograms`` (the layout of the first)."""
        parts = list(histograms)
        if not parts:
            return cls()
        first = parts[0]
        result = cls(first.highest, first.significant_digits, first.lowest)
        for part in parts:
            result.add(part)
        return result

    # -- reading ---------------------------------------------------------------------------

    def _bucket_of(self, index: Any) -> tuple[Any, Any]:
        """(lowest value, width) of the buckets at ``index``."""
        bucket = (index >> self._half_magnitude) - 1
        sub_bucket = (index & (self._half_count - 1)) + self._half_count
        first = bucket < 0
        sub_bucket = np.where(first, sub_bucket - self._half_count, sub_bucket)
        bucket = np.where(first, 0, bucket)
        shift = bucket + self._unit_magnitude
        return sub_bucket << shift, np.left_shift(1, shift)

    def lowest_equivalent(self, index: int) -> int:
        """The smallest value counted in the bucket at ``index``."""
        low, _ = self._bucket_of(np.int64(index))
        return int(low)

    def highest_equivalent(self, index: int) -> int:
        """The largest value counted in the bucket at ``index``."""
        low, width = self._bucket_of(np.int64(index))
        return int(low + width - 1)

    def index_of(self, value: int) -> int:
        """The index of the bucket that counts ``value``."""
        return int(self._indexes(np.array([min(max(value, 0), self.highest)]))[0])

    def value_at_percentile(self, percentile: float) -> int:
        """The largest value of the bucket holding the ``percentile``-th value in order
        (nearest rank: at least ``percentile``% of the values are no larger); 0 when
        empty. At 0 it is the smallest value of the first bucket used."""
        return self.values_at_percentiles([percentile])[0]

    def values_at_percentiles(self, percentiles: Iterable[float]) -> list[int]:
        """:meth:`value_at_percentile` for each of ``percentiles`` (0 to 100)."""
        wanted = list(percentiles)
        if not self.total:
            return [0] * len(wanted)
        cumulative = np.cumsum(self.counts)
        values = []
        for percentile in wanted:
            # Rounded first, so that 99.9% of 1,000 values is rank 999, not 1,000.
            rank = max(1, math.ceil(round(min(max(percentile, 0.0), 100.0) * self.total / 100, 7)))
            index = int(np.searchsorted(cumulative, rank))
            values.append(
                self.highest_equivalent(index) if percentile > 0 else self.lowest_equivalent(index)
            )
        return values

    def recorded(self) -> Iterator[tuple[int, int]]:
        """(bucket index, count) of every bucket used, in order of value."""
        for index in np.flatnonzero(self.counts):
            yield int(index), int(self.counts[index])

    def mean_and_stddev(self) -> tuple[float, float]:
        """HdrHistogram's mean and standard deviation: each value taken at the middle of
        its bucket (:attr:`sum` / :attr:`total` is the exact mean)."""
        if not self.total:
            return 0.0, 0.0
        used = np.flatnonzero(self.counts)
        low, width = self._bucket_of(used)
        middle = (low + (width >> 1)).astype(np.float64)
        weights = self.counts[used].astype(np.float64)
        mean = float(np.dot(middle, weights) / self.total)
        variance = float(np.dot((middle - mean) ** 2, weights) / self.total)
        return mean, math.sqrt(variance)

    @property
    def bucket_count(self) -> int:
        """HdrHistogram's "Buckets": value ranges of doubling width."""
        return self.counts.size // self._half_count - 1

    @property
    def sub_bucket_count(self) -> int:
        """HdrHistogram's "SubBuckets": values per bucket."""
        return self._half_count * 2

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        used = max(_used_length(self.counts), _used_length(other.counts))
        return (
            (self.significant_digits, self.lowest, self.highest)
            == (other.significant_digits, other.lowest, other.highest)
            and (self.total, self.min, self.max, self.sum)
            == (other.total, other.min, other.max, other.sum)
            and bool(np.array_equal(self.counts[:used], other.counts[:used]))
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    # -- HdrHistogram's V2 compressed encoding -------------------------------------------

    def encode(self) -> str:
        """The counts as HdrHistogram's V2 compressed encoding, in base64 (``HISTFAAA...``).

        The encoding holds the counts and the layout, not the exact :attr:`min`,
        :attr:`max` and :attr:`sum`; :meth:`to_json` keeps those beside it.
        """
        body = bytearray()
        previous = 0  # the index after the last bucket written
        for index in np.flatnonzero(self.counts):
            gap = int(index) - previous
            if gap:
                _put_varint(body, -gap if gap > 1 else 0)
            _put_varint(body, int(self.counts[index]))
            previous = int(index) + 1
        header = _PAYLOAD_HEADER.pack(
            _PAYLOAD_COOKIE, len(body), 0, self.significant_digits,
            self.lowest, self.highest, 1.0,
        )  # fmt: skip
        deflated = zlib.compress(header + body)
        blob = _COMPRESSED_HEADER.pack(_COMPRESSED_COOKIE, len(deflated)) + deflated
        return base64.b64encode(blob).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> Histogram:
        """A histogram from HdrHistogram's V2 compressed encoding in base64.

        :attr:`min` and :attr:`max` are then those of the buckets used (the exact ones
        are not in the encoding) and :attr:`sum` is taken at the middle of each bucket.

        Raises:
            HistogramError: the text is not such an encoding, or is damaged.
        """
        try:
            blob = base64.b64decode(text.strip(), validate=True)
            cookie, length = _COMPRESSED_HEADER.unpack_from(blob)
            if cookie & _COOKIE_BASE_MASK != _COMPRESSED_COOKIE & _COOKIE_BASE_MASK:
                raise HistogramError("not an HdrHistogram V2 compressed histogram")
            deflated = blob[_COMPRESSED_HEADER.size : _COMPRESSED_HEADER.size + length]
            inflater = zlib.decompressobj()
            payload = inflater.decompress(deflated, _MAX_PAYLOAD)
            if not inflater.eof or len(deflated) != length:
                raise HistogramError("the histogram's encoding is cut short or too large")
            cookie, body_length, offset, digits, lowest, highest, _ = _PAYLOAD_HEADER.unpack_from(
                payload
            )
        except (binascii.Error, struct.error, zlib.error, ValueError) as exc:
            if isinstance(exc, HistogramError):
                raise
            raise HistogramError(f"not an HdrHistogram encoding: {exc}") from None
        if cookie & _COOKIE_BASE_MASK != _PAYLOAD_COOKIE & _COOKIE_BASE_MASK:
            raise HistogramError("not an HdrHistogram V2 payload")
        if offset:
            raise HistogramError("a shifted (normalized) HdrHistogram is not supported")
        histogram = cls(highest, digits, lowest)
        body = payload[_PAYLOAD_HEADER.size : _PAYLOAD_HEADER.size + body_length]
        if len(body) != body_length:
            raise HistogramError("the histogram's encoding is cut short")
        limit = min(histogram.counts.size, _MAX_COUNTS)
        index = position = 0
        counts: dict[int, int] = {}
        try:
            while position < len(body):
                value, position = _get_varint(body, position)
                if value < 0:
                    index -= value
                    continue
                if value and index < limit:
                    counts[index] = value
                index += 1
        except IndexError:
            raise HistogramError("the histogram's encoding is cut short") from None
        if index > limit:
            raise HistogramError("the histogram's counts run past its own range")
        for at, count in counts.items():
            histogram.counts[at] = count
        histogram._derive_totals()
        return histogram

    def _derive_totals(self) -> None:
        """total, min, max and sum from the counts alone (after decoding)."""
        self.total = int(self.counts.sum())
        if not self.total:
            return
        used = np.flatnonzero(self.counts)
        self.min = self.lowest_equivalent(int(used[0]))
        self.max = self.highest_equivalent(int(used[-1]))
        low, width = self._bucket_of(used)
        self.sum = int(np.dot(low + (width >> 1), self.counts[used]))

    # -- in a bench result ------------------------------------------------------------------

    def to_json(self, unit: str = "ns") -> dict[str, Any]:
        """A JSON-ready record: the encoding, its unit and the exact extremes and sum."""
        return {
            "format": "HdrHistogram V2 compressed, base64",
            "unit": unit,
            "significant_digits": self.significant_digits,
            "lowest": self.lowest,
            "highest": self.highest,
            "total_count": self.total,
            "min": self.min,
            "max": self.max,
            "sum": self.sum,
            "encoded": self.encode(),
        }

    @classmethod
    def from_json(cls, record: Any, unit: str = "ns") -> Histogram:
        """The histogram of a :meth:`to_json` record.

        Raises:
            HistogramError: the record is not one, is in another unit, or its counts do
                not add up to its total.
        """
        if not isinstance(record, dict) or not isinstance(record.get("encoded"), str):
            raise HistogramError("no latency histogram")
        if record.get("unit") != unit:
            raise HistogramError(f"a histogram in {record.get('unit')!r}, not {unit!r}")
        histogram = cls.decode(record["encoded"])
        if histogram.total != record.get("total_count"):
            raise HistogramError(
                f"the histogram counts {histogram.total} values, its record says "
                f"{record.get('total_count')}"
            )
        low, high, total = record.get("min"), record.get("max"), record.get("sum")
        if histogram.total and isinstance(low, int) and isinstance(high, int):
            histogram.min, histogram.max = low, high
        if histogram.total and isinstance(total, int):
            histogram.sum = total
        return histogram


def _used_length(counts: npt.NDArray[np.int64]) -> int:
    """How many leading entries of ``counts`` hold all its non-zero counts."""
    used = np.flatnonzero(counts)
    return int(used[-1]) + 1 if used.size else 0


def _put_varint(out: bytearray, value: int) -> None:
    """ZigZag, then LEB128 in at most 9 bytes (the 9th carries 8 bits), as HdrHistogram."""
    value = (value << 1) if value >= 0 else ((-value) << 1) - 1
    for _ in range(8):
        if value < 0x80:
            out.append(value)
            return
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value & 0xFF)


def _get_varint(data: bytes, position: int) -> tuple[int, int]:
    """The value at ``position`` of ``data`` and the position after it."""
    value = 0
    for shift in range(0, 56, 7):
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        value |= data[position] << 56
        position += 1
    return (value >> 1) ^ -(value & 1), position
