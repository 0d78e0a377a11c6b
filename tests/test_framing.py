"""The pure framing core: no loop, no sockets."""

from __future__ import annotations

import itertools
import unittest.mock
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from netframe import framing
from netframe.framing import (
    SEGMENT_FLOOR as SEGMENT,
)
from netframe.framing import (
    AutoFramer,
    Framer,
    LengthFramer,
    LineFramer,
    RawFramer,
    split_terminator,
)

LIMIT = 1024
EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def feed_all(framer: Framer, chunks: list[bytes]) -> list[tuple[bytes, bytes]]:
    messages = []
    for chunk in chunks:
        messages += framer.feed(chunk)
    return messages


def test_raw_chunk_is_one_message() -> None:
    framer = RawFramer(1024)
    assert framer.feed(b"Michael") == [(b"Michael", b"")]
    assert framer.feed(b"a\nb\n") == [(b"a\nb\n", b"")]
    assert framer.greeting_terminator == b""


def test_line_reassembles_and_keeps_each_terminator() -> None:
    framer = LineFramer(LIMIT)
    assert framer.feed(b"Bo") == []
    assert framer.feed(b"b\r") == []
    assert framer.feed(b"\nAlice\nCarl") == [(b"Bob", b"\r\n"), (b"Alice", b"\n")]
    assert framer.feed(b"\n") == [(b"Carl", b"\n")]
    assert framer.greeting_terminator == b"\n"


def test_line_empty_lines_are_messages() -> None:
    assert LineFramer(LIMIT).feed(b"\n\r\n") == [(b"", b"\n"), (b"", b"\r\n")]


def test_line_longer_than_limit_overflows_after_earlier_lines() -> None:
    framer = LineFramer(4)
    assert framer.feed(b"abcd\nabcde\nok\n") == [(b"abcd", b"\n")]
    assert framer.overflow
    assert framer.feed(b"more\n") == []


def test_partial_line_longer_than_limit_overflows_without_waiting_for_newline() -> None:
    framer = LineFramer(4)
    assert framer.feed(b"abcd\r") == []  # the \r of a \r\n may still come
    assert not framer.overflow
    framer.feed(b"x")
    assert framer.overflow


DELAY = 0.25


def auto(limit: int = LIMIT) -> AutoFramer:
    return AutoFramer(limit, DELAY)


def test_auto_a_short_bare_word_is_a_message_at_once_and_the_client_stays_bare() -> None:
    framer = auto()
    assert framer.greeting_terminator == b""
    assert framer.feed(b"Michael") == [(b"Michael", b"")]
    assert framer.wake_after is None  # nothing to wait for
    # Known bare now: each read is one message, a trailing line ending put back on replies.
    assert framer.feed(b"Tracy") == [(b"Tracy", b"")]
    assert framer.feed(b"Sarah\n") == [(b"Sarah", b"\n")]


def test_auto_a_bare_client_that_sends_a_newline_is_answered_for_the_whole_read() -> None:
    framer = auto()
    framer.feed(b"Michael")
    assert framer.feed(b"Tra\ncy") == [(b"Tra\ncy", b"")]
    assert framer.feed(b"Sarah") == [(b"Sarah", b"")]  # never stuck waiting for a line


def test_auto_a_newline_first_makes_a_line_client_for_good() -> None:
    framer = auto()
    assert framer.feed(b"Bob\nAl") == [(b"Bob", b"\n")]
    assert framer.wake_after is None  # a partial line waits as long as it takes
    assert framer.timeout() == []
    assert framer.feed(b"ice\r\n") == [(b"Alice", b"\r\n")]
    assert framer.feed(b"x") == []  # short, but a line client's partial line


def test_auto_a_long_first_line_in_segments_is_one_message() -> None:
    framer = auto(8192)
    line = b"y" * 4000
    for start in range(0, 4000 - SEGMENT, SEGMENT):
        assert framer.feed(line[start : start + SEGMENT]) == []
        assert framer.wake_after == DELAY  # may be one segment of a longer write
    assert framer.feed(line[(4000 // SEGMENT) * SEGMENT :] + b"\n") == [(line, b"\n")]


def test_auto_a_long_bare_first_word_is_a_message_when_a_short_read_ends_it() -> None:
    framer = auto()
    assert framer.feed(b"z" * SEGMENT) == []
    assert framer.feed(b"z" * 100) == [(b"z" * (SEGMENT + 100), b"")]


def test_auto_a_long_bare_first_word_alone_is_a_message_after_the_delay() -> None:
    framer = auto()
    assert framer.feed(b"z" * SEGMENT) == []
    assert framer.timeout() == [(b"z" * SEGMENT, b"")]
    assert framer.feed(b"next") == [(b"next", b"")]


def test_auto_end_of_input_answers_held_bytes_but_drops_a_partial_line() -> None:
    undecided = auto()
    undecided.feed(b"w" * SEGMENT)
    assert undecided.eof() == [(b"w" * SEGMENT, b"")]
    lines = auto()
    lines.feed(b"a\npart")
    assert lines.eof() == []


def test_auto_undecided_bytes_are_bounded() -> None:
    framer = auto(8)
    framer.feed(b"x" * 20)
    assert framer.overflow


def line_auto(limit: int) -> AutoFramer:
    """An auto framer whose client has sent a newline: from then on it frames as line."""
    framer = AutoFramer(limit, DELAY)
    assert framer.feed(b"first\n") == [(b"first", b"\n")]
    return framer


@given(
    line=st.binary(min_size=SEGMENT, max_size=5000).map(lambda b: b.replace(b"\n", b"")),
    cuts=st.lists(st.integers(SEGMENT, 5000), max_size=8),
)
def test_auto_a_first_line_cut_into_segments_of_at_least_the_floor_is_one_message(
    line: bytes, cuts: list[int]
) -> None:
    stream = line + b"\n"
    # TCP segments of one write: every piece but the last at least SEGMENT_FLOOR long.
    edges = [0]
    for cut in sorted(cuts):
        if cut - edges[-1] >= SEGMENT and cut < len(stream):
            edges.append(cut)
    chunks = [stream[a:b] for a, b in itertools.pairwise([*edges, len(stream)])]
    framer = AutoFramer(LIMIT * 8, DELAY)
    messages = [m for chunk in chunks for m in framer.feed(chunk)]
    assert messages == [split_terminator(stream)]


def test_framers_without_a_timer_never_ask_for_one() -> None:
    for framer in (LineFramer(LIMIT), RawFramer(1024)):
        framer.feed(b"abc")
        assert framer.wake_after is None
        assert framer.timeout() == []


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"Bob", (b"Bob", b"")),
        (b"Bob\n", (b"Bob", b"\n")),
        (b"Bob\r\n", (b"Bob", b"\r\n")),
        (b"Bob\r", (b"Bob\r", b"")),
        (b"a\nb\n", (b"a\nb", b"\n")),
    ],
)
def test_split_terminator(payload: bytes, expected: tuple[bytes, bytes]) -> None:
    assert split_terminator(payload) == expected


def test_raw_chunk_over_the_limit_is_cut_into_pieces_of_the_limit() -> None:
    framer = RawFramer(4)
    assert framer.feed(b"four") == [(b"four", b"")]
    assert framer.feed(b"fivesix") == [(b"five", b""), (b"six", b"")]
    assert not framer.overflow


# -- property: line framing, whatever the chunking, up to and over the limit ---------------

SMALL_LIMIT = 16
# Payloads from empty to a few bytes over the limit: "a", "\r" (inside, and just before
# the "\n", where it makes a "\r\n") and NUL; or any bytes at all but "\n".
near_limit = st.one_of(
    st.lists(st.sampled_from([b"a", b"\r", b"\x00"]), max_size=SMALL_LIMIT + 3).map(b"".join),
    st.binary(max_size=SMALL_LIMIT + 3).map(lambda b: b.replace(b"\n", b"")),
)
limit_lines = st.lists(st.tuples(near_limit, st.sampled_from([b"\n", b"\r\n"])), max_size=12)


def expected_under_limit(stream: bytes, limit: int) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The messages a line framer must produce from ``stream``, and whether it overflows."""
    *complete, partial = stream.split(b"\n")
    messages = []
    for line in complete:
        payload, term = (line[:-1], b"\r\n") if line.endswith(b"\r") else (line, b"\n")
        if len(payload) > limit:
            return messages, True
        messages.append((payload, term))
    return messages, over_limit(partial, limit)


def over_limit(unfinished: bytes, limit: int) -> bool:
    """An unfinished line is over the limit: one byte more is allowed only when it is a
    "\r" whose "\n" may still come."""
    excess = len(unfinished) - limit
    return excess > 1 or (excess == 1 and not unfinished.endswith(b"\r"))


def feed_and_pump(framer: Framer, chunks: list[bytes], limit: int) -> list[tuple[bytes, bytes]]:
    """Feed every chunk, asking for unparsed lines as the endpoint does, checking the
    framer never holds more than one unfinished line's worth of bytes."""
    messages = []
    for chunk in chunks:
        messages += pump(framer, framer.feed(chunk))
        assert len(framer.partial) <= limit + 1
    return messages


def pump(framer: Framer, messages: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``messages`` and the ones the framer still holds complete, as the endpoint asks."""
    while framer.unparsed:
        messages += framer.feed(b"")
    return messages


@pytest.mark.parametrize("framer_class", [LineFramer, line_auto])
@given(
    body=limit_lines,
    tail=near_limit,
    cuts=st.lists(st.integers(0, 400), max_size=10),
    batch=st.sampled_from([1, 2, 3, 1024]),
)
def test_any_chunking_gives_the_same_messages_and_overflow_and_eof_drops_the_partial(
    framer_class: type[LineFramer],
    body: list[tuple[bytes, bytes]],
    tail: bytes,
    cuts: list[int],
    batch: int,
) -> None:
    stream = b"".join(payload + term for payload, term in body) + tail
    edges = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(edges)]
    expected, overflows = expected_under_limit(stream, SMALL_LIMIT)
    framer = framer_class(SMALL_LIMIT)
    with unittest.mock.patch.object(framing, "MAX_BATCH", batch):
        got = feed_and_pump(framer, chunks, SMALL_LIMIT)
    assert got == expected
    assert framer.overflow == overflows
    # A trailing unfinished line is held, not delivered, and never asks for a timer ...
    assert bytes(framer.partial) == (b"" if overflows else stream.rpartition(b"\n")[2])
    assert framer.wake_after is None
    # ... and the end of input drops it: the peer never finished it.
    assert framer.eof() == []
    assert not framer.partial
    assert feed_all(framer, [b"\n"]) == ([] if overflows else [(b"", b"\n")])


# -- property: auto framing against a model of its rules -------------------------------------


class AutoModel:
    """``auto`` framing as :class:`AutoFramer`'s docstring states it, over a whole stream.

    Undecided bytes are held until a newline makes a line connection (framed from then
    on as ``line`` framing frames, the held bytes starting its first line), or a read
    shorter than ``SEGMENT_FLOOR``, a timeout or the end makes them one bare message
    (a bare connection from then on: each read one message, a trailing line ending taken
    off, a read over the limit cut into pieces of the limit, the line ending kept for the
    last). Held bytes are bounded as an unfinished line is, and bytes made bare are cut
    into pieces of the limit too.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.state = "undecided"
        self.held = b""
        self.line_stream = b""
        self.bare: list[tuple[bytes, bytes]] = []
        self.held_overflow = False
        self.ended = False

    def feed(self, data: bytes) -> None:
        if self.state == "lines":
            self.line_stream += data
        elif self.state == "bare":
            if len(data) <= self.limit:
                self.bare.append(split_terminator(data))
            else:
                self.bare += self._pieces(*split_terminator(data))
        elif b"\n" in data:
            self.state, self.line_stream, self.held = "lines", self.held + data, b""
        else:
            self.held += data
            if over_limit(self.held, self.limit):
                self.held_overflow, self.held = True, b""
            elif len(data) < SEGMENT:  # where the sender's write ended
                self._bare()
            # else: perhaps one segment of a longer write: wait for more, or the timeout

    def timeout(self) -> None:
        if self.state == "undecided" and self.held:
            self._bare()

    def eof(self) -> None:
        self.timeout()
        self.ended = True

    def _bare(self) -> None:
        # The held bytes may be limit + 1 long here (a "\r" that could have begun a
        # "\r\n"): as a bare message they are cut to the limit.
        self.bare += self._pieces(self.held, b"")
        self.state, self.held = "bare", b""

    def _pieces(self, payload: bytes, ending: bytes) -> list[tuple[bytes, bytes]]:
        cut = range(0, len(payload), self.limit)
        pieces = [(payload[i : i + self.limit], b"") for i in cut] or [(b"", b"")]
        pieces[-1] = (pieces[-1][0], ending)
        return pieces

    @property
    def messages(self) -> list[tuple[bytes, bytes]]:
        if self.state == "lines":
            return expected_under_limit(self.line_stream, self.limit)[0]
        return self.bare

    @property
    def overflow(self) -> bool:
        if self.state == "lines":
            return expected_under_limit(self.line_stream, self.limit)[1]
        return self.held_overflow

    @property
    def partial(self) -> bytes:
        if self.state == "lines" and not self.overflow and not self.ended:
            return self.line_stream.rpartition(b"\n")[2]
        return self.held

    @property
    def waiting(self) -> bool:
        """Undecided bytes are held: the framer wants a timeout."""
        return bool(self.held)


# Reads of every kind: short ones (lines, pieces of lines, bare words, "\r" and "\r\n"
# endings), and ones around SEGMENT_FLOOR, which may be one segment of a longer write.
short_read = st.lists(
    st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"\x00"]), min_size=1, max_size=24
).map(b"".join)
segment_read = st.builds(
    lambda size, end: b"a" * size + end,
    st.sampled_from([SEGMENT - 1, SEGMENT, SEGMENT + 1, SEGMENT + 7, SEGMENT + 8]),
    st.sampled_from([b"", b"\r", b"\n", b"\r\n"]),
)
auto_events = st.lists(
    st.one_of(segment_read, short_read, st.just("timeout")), min_size=1, max_size=8
)


# A small limit, and one just above SEGMENT_FLOOR: only then can undecided bytes be held
# for a timeout, and reach the limit while held.
@pytest.mark.parametrize("limit", [SMALL_LIMIT, SEGMENT + 8])
@given(events=auto_events, batch=st.sampled_from([1, 2, 1024]))
def test_auto_framing_follows_its_rules_through_reads_timeouts_and_the_end(
    limit: int, events: list[bytes | str], batch: int
) -> None:
    framer, model = AutoFramer(limit, DELAY), AutoModel(limit)
    got: list[tuple[bytes, bytes]] = []
    with unittest.mock.patch.object(framing, "MAX_BATCH", batch):
        for event in [*events, "eof"]:
            if framer.overflow:
                break  # the endpoint closes here and gives the framer nothing more
            if event == "timeout":
                got += framer.timeout()
                model.timeout()
            elif event == "eof":
                got += framer.eof()
                model.eof()
            else:
                assert isinstance(event, bytes)
                got += pump(framer, framer.feed(event))
                model.feed(event)
            assert got == model.messages, event
            assert framer.overflow == model.overflow
            assert bytes(framer.partial) == model.partial
            assert framer.wake_after == (DELAY if model.waiting else None)


def state(framer: Framer) -> tuple[object, ...]:
    """Everything the endpoint reads of a framer, and the auto framer's mode."""
    mode = framer._state if isinstance(framer, AutoFramer) else None
    partial = bytes(framer.partial)
    return framer.overflow, partial, framer.unparsed, framer.wake_after, mode


def whole_then_feed(framer: Framer, data: bytes) -> list[tuple[bytes, bytes]]:
    """What the endpoint does with a read: ``_whole`` first, ``feed`` when it declines."""
    before = state(framer)
    payload = framer._whole(data)
    if payload is None:
        assert state(framer) == before  # declined: nothing changed
        return framer.feed(data)
    assert data.startswith(payload)
    assert data[len(payload) :] in (b"", b"\n", b"\r\n")
    return [(payload, data[len(payload) :])]


@pytest.mark.parametrize("make", [RawFramer, LineFramer, auto], ids=["raw", "line", "auto"])
@pytest.mark.parametrize("limit", [SMALL_LIMIT, SEGMENT + 8])
@given(events=auto_events)
def test_a_read_taken_whole_frames_as_feed_frames_it(
    make: Callable[[int], Framer], limit: int, events: list[bytes | str]
) -> None:
    """The endpoint's fast path (``Framer._whole``) gives the messages ``feed`` gives,
    and leaves the framer as ``feed`` leaves it, whatever came before."""
    fed, taken = make(limit), make(limit)
    for event in events:
        if fed.overflow:
            break
        if event == "timeout":
            assert taken.timeout() == fed.timeout()
        else:
            assert isinstance(event, bytes)
            assert pump(taken, whole_then_feed(taken, event)) == pump(fed, fed.feed(event))
        assert state(taken) == state(fed)


def test_a_user_framer_is_never_taken_whole() -> None:
    """Only netframe's own framers are asked: a subclass's ``feed`` is not gone around."""
    assert framing.make_framer("raw", LIMIT, DELAY).whole_reads
    assert framing.make_framer("line", LIMIT, DELAY).whole_reads
    assert framing.make_framer("auto", LIMIT, DELAY).whole_reads
    assert not framing.make_framer("length", LIMIT, DELAY).whole_reads
    assert not framing.user_framers(lambda: RawFramer(LIMIT), LIMIT).whole_reads


def test_auto_a_bare_read_of_only_a_line_ending_over_the_limit_is_an_empty_message() -> None:
    framer = AutoFramer(1, DELAY)
    assert framer.feed(b"a") == [(b"a", b"")]  # a bare client from now on
    assert framer.feed(b"\r\n") == [(b"", b"\r\n")]  # two bytes, over the limit of one
    assert framer.feed(b"bc\r\n") == [(b"b", b""), (b"c", b"\r\n")]


def test_auto_after_an_overflow_frames_nothing_more() -> None:
    framer = AutoFramer(SMALL_LIMIT, DELAY)
    assert framer.feed(b"x" * (SMALL_LIMIT + 2)) == []
    assert framer.overflow
    assert framer.feed(b"more") == []
    assert framer.feed(b"more\n") == []


@pytest.mark.parametrize("ending", ["short read", "timeout", "eof"])
def test_auto_no_bare_message_is_longer_than_the_limit(ending: str) -> None:
    # max_line_bytes is the "longest message in line and auto framing"; on a connection
    # already bare, the same bytes are cut into pieces of the limit.
    limit = SMALL_LIMIT if ending == "short read" else SEGMENT + 8
    framer = AutoFramer(limit, DELAY)
    messages = framer.feed(b"x" * limit + b"\r")
    messages += framer.timeout() if ending == "timeout" else framer.eof()
    assert all(len(payload) <= limit for payload, _ in messages), messages


def test_a_read_of_many_lines_comes_out_in_batches() -> None:
    framer = LineFramer(LIMIT)
    first = framer.feed(b"x\n" * (framing.MAX_BATCH + 5) + b"part")
    assert len(first) == framing.MAX_BATCH
    assert framer.unparsed
    assert not framer.partial
    assert framer.feed(b"") == [(b"x", b"\n")] * 5
    assert (framer.unparsed, framer.partial) == (b"", b"part")
    assert framer.feed(b"ial\n") == [(b"partial", b"\n")]


class LineFramerUnderLimit(RuleBasedStateMachine):
    """Random feeds and pumps of a line framer, checked against the whole-stream model."""

    def __init__(self) -> None:
        super().__init__()
        # Small batches, so that pumping the unparsed lines is part of the game.
        self._small_batches = unittest.mock.patch.object(framing, "MAX_BATCH", 2)
        self._small_batches.start()
        self.framer = LineFramer(SMALL_LIMIT)
        self.stream = b""
        self.messages: list[tuple[bytes, bytes]] = []

    @rule(chunk=st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n"]), max_size=30))
    def feed(self, chunk: list[bytes]) -> None:
        data = b"".join(chunk)
        self.stream += data
        self.messages += self.framer.feed(data)

    @rule()
    def pump(self) -> None:
        while self.framer.unparsed:
            self.messages += self.framer.feed(b"")

    @invariant()
    def holds_at_most_one_line_and_agrees_with_the_model(self) -> None:
        assert len(self.framer.partial) <= SMALL_LIMIT + 1
        expected, overflows = expected_under_limit(self.stream, SMALL_LIMIT)
        assert self.messages == expected[: len(self.messages)]
        if not self.framer.unparsed:
            assert self.messages == expected
            assert self.framer.overflow == overflows

    def teardown(self) -> None:
        self._small_batches.stop()


TestLineFramerUnderLimit = LineFramerUnderLimit.TestCase


# -- length framing ------------------------------------------------------------------


def prefixed(payload: bytes, size: int = 4) -> bytes:
    return len(payload).to_bytes(size, "big") + payload


@pytest.mark.parametrize("size", [2, 4])
@given(payloads=st.lists(st.binary(max_size=300), max_size=10), cuts=st.lists(st.integers(0, 4000)))
def test_length_any_chunking_gives_the_same_messages(
    size: int, payloads: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(prefixed(p, size) for p in payloads)
    edges = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    framer = LengthFramer(1024, size)
    got = feed_and_pump(framer, [stream[a:b] for a, b in itertools.pairwise(edges)], 10**6)
    assert got == [(p, b"") for p in payloads]
    assert not framer.partial
    assert not framer.overflow


def test_length_refuses_an_oversized_message_at_its_prefix_before_the_payload() -> None:
    framer = LengthFramer(1024)
    assert framer.feed(prefixed(b"ok") + (10**9).to_bytes(4, "big")) == [(b"ok", b"")]
    assert framer.overflow  # no payload byte needed: nothing was allocated for it
    assert framer.feed(b"more") == []


def test_length_holds_a_partial_message_and_encodes_replies_with_its_prefix() -> None:
    framer = LengthFramer(1024, 2)
    assert framer.feed(b"\x00\x05hel") == []
    assert framer.partial
    assert framer.feed(b"lo") == [(b"hello", b"")]
    assert not framer.partial
    assert framer.encode(b"Hello, hello!", b"") == b"\x00\x0dHello, hello!"


def test_length_returns_at_most_a_batch_per_call() -> None:
    framer = LengthFramer(1024)
    framer.feed(prefixed(b"x") * (framing.MAX_BATCH + 3))
    assert framer.unparsed
    assert framer.feed(b"") == [(b"x", b"")] * 3


def test_a_user_framer_is_loaded_by_module_and_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    framer = framing.make_framer("netstring:Netstring", 16, 0.25)()
    assert framer.feed(b"5:hello,") == [(b"hello", b"")]
    assert framer.encode(b"hi", b"") == b"2:hi,"
    for spec, error in [
        ("netstring:Nope", "cannot load framer"),
        ("no_such_module:X", "cannot load framer"),
        ("json:dumps", "failed"),
        ("collections:OrderedDict", "not a framer"),
    ]:
        with pytest.raises(ValueError, match=error):
            framing.make_framer(spec, 16, 0.25)


@given(
    data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000)), limit=st.integers(1, 700)
)
def test_raw_any_chunking_keeps_every_byte_in_order_in_pieces_within_the_limit(
    data: bytes, cuts: list[int], limit: int
) -> None:
    edges = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    framer = RawFramer(limit)
    messages = feed_all(framer, [data[a:b] for a, b in itertools.pairwise(edges)])
    assert b"".join(payload for payload, _ in messages) == data
    assert all(0 < len(payload) <= limit and end == b"" for payload, end in messages)
