"""The server's tick (netframe._ticker): every TICK_S on each loop, without a pending timer
on asyncio's own loop, whose every iteration would pay for one, and (on Linux) without a
thread, whose presence costs every socket call."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time

import pytest
from conftest import raw_client, raw_receive, raw_receive_until_end, raw_send, wait_until

from netframe import Server, _ticker
from netframe._resolve import getaddrinfo
from netframe._ticker import start_ticker

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("loop_checked")]


def tick_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "netframe-tick" and t.is_alive()]


def other_threads() -> set[str]:
    """The threads running, but the log writer."""
    return {t.name for t in threading.enumerate() if t.name != "netframe-log"}


@pytest.fixture(params=["timerfd", "thread"])
def ticker_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """On asyncio's loop, the Linux timerfd or the thread the tick falls back to."""
    if request.param == "thread":

        def refused(interval_s: float) -> int:
            raise OSError("no timerfd here")

        monkeypatch.setattr(_ticker, "timerfd", refused)
    return str(request.param)


async def test_the_tick_runs_with_no_timer_pending_on_asyncios_loop() -> None:
    loop = asyncio.get_running_loop()
    before = len(tick_threads())
    threads_before = other_threads()
    server = Server(tcp=["127.0.0.1:0"], idle_timeout_s=0.3)
    await server.start()
    try:
        async with raw_client(server) as sock:
            assert await raw_receive(sock, 8) == b"Welcome!"
            await raw_send(sock, b"Ann\n")
            assert await raw_receive(sock, 12) == b"Hello, Ann!\n"
            if isinstance(loop, asyncio.BaseEventLoop):
                # The heap the selector loop reads at every iteration holds nothing ...
                scheduled = loop._scheduled  # type: ignore[attr-defined]
                timers = [h for h in scheduled if not h.cancelled()]
                assert timers == []
                # ... and on Linux no thread ticks, nor is left from resolving the
                # address (the log writer's, which ends when idle, is tested in test_logs).
                if sys.platform == "linux":
                    assert len(tick_threads()) == before
                    assert other_threads() == threads_before
                else:
                    assert len(tick_threads()) == before + 1
            # The tick still runs the deadlines: the idle client is closed.
            started = time.monotonic()
            assert await raw_receive_until_end(sock) == b""
            assert time.monotonic() - started >= 0.2
    finally:
        await server.close()
    assert len(tick_threads()) == before  # the tick's thread ends with the server


async def test_a_busy_loop_gets_one_tick_when_free_not_a_backlog(ticker_kind: str) -> None:
    loop = asyncio.get_running_loop()
    ticks: list[float] = []
    ticker = start_ticker(loop, 0.02, lambda: ticks.append(time.monotonic()))
    try:
        await wait_until(lambda: len(ticks) >= 2)
        time.sleep(0.3)  # noqa: ASYNC251  # the loop blocked, on purpose, for 15 intervals
        blocked_until = time.monotonic()
        await asyncio.sleep(0.1)
        after = [t for t in ticks if t >= blocked_until]
        assert after, "ticks stopped"
        # At most a few in the next 40 ms (two intervals), not the fifteen missed at once.
        assert sum(t - blocked_until < 0.04 for t in after) <= 4, after
    finally:
        ticker.cancel()
    count = len(ticks)
    await asyncio.sleep(0.1)
    assert len(ticks) == count  # cancelled means no further tick


async def test_a_failing_tick_does_not_end_the_ticking(ticker_kind: str) -> None:
    loop = asyncio.get_running_loop()
    calls: list[int] = []

    def tick() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in one tick")

    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, context: None)  # the loop reports it; not here
    ticker = start_ticker(loop, 0.02, tick)
    try:
        await wait_until(lambda: len(calls) >= 3)
    finally:
        ticker.cancel()
        loop.set_exception_handler(handler)


def resolve_threads() -> int:
    return sum(t.name == "netframe-resolve" for t in threading.enumerate())


async def test_a_listeners_address_is_resolved_without_a_thread_left_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A numeric host is turned into an address at once; a name is looked up in a thread
    of its own that ends with the lookup (the loop's executor would keep its thread)."""
    assert await getaddrinfo("127.0.0.1", 7, kind=socket.SOCK_STREAM) == socket.getaddrinfo(
        "127.0.0.1", 7, type=socket.SOCK_STREAM
    )
    assert resolve_threads() == 0
    found = await getaddrinfo("localhost", 7, kind=socket.SOCK_DGRAM)
    assert found == socket.getaddrinfo("localhost", 7, type=socket.SOCK_DGRAM)
    await wait_until(lambda: resolve_threads() == 0)
    # A lookup that fails raises the resolver's error in the awaiting task.
    looked_up = threading.Event()

    def refuse(host: str, port: int, **kwargs: object) -> list[object]:
        if not kwargs["flags"]:  # (the numeric try carries AI_NUMERICHOST)
            looked_up.set()
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    with pytest.raises(socket.gaierror, match="not known"):
        await getaddrinfo("nowhere.invalid", 7, kind=socket.SOCK_STREAM)
    assert looked_up.is_set()
    await wait_until(lambda: resolve_threads() == 0)
