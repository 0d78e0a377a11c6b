"""The command line's interactive client (``netframe client -i``), like ``nc``.

Each line of stdin is sent as one message (one datagram over UDP), and replies are
printed as they arrive, pushes included, not one per line sent. The end of stdin
half-closes a TCP connection, which then lasts until the server closes it; over UDP the
client waits for the replies still missing, each for at most the client's timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import locale
import os
import sys
import threading
from collections.abc import Coroutine
from typing import Any

from netframe.client import ClientError, TcpClient, UdpClient
from netframe.config import Address

__all__ = ["InputError", "encode", "interact_tcp", "interact_udp", "show"]


class InputError(Exception):
    """Input the client cannot send, found during the session: a usage error."""


def encode(text: str, encoding: str) -> bytes:
    try:
        return text.encode(encoding)
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end]
        raise InputError(f"cannot encode {bad!r} as {encoding}") from None


def show(reply: bytes, encoding: str) -> None:
    print(reply.decode(encoding, errors="replace"), flush=True)


# The interactive client (-i). The event loop takes what the stdin thread reads and
# what arrives from the server as it comes; the end of a task that prints replies is
# queued with stdin's chunks as ``None``.
_Events = asyncio.Queue[bytes | OSError | None]
_STDIN_CHUNK = 64 * 1024
#: How long bare framing waits for a greeting before the first line: a server that
#: greets does so as the connection opens; one that does not must not stall the start.
_GREETING_WAIT_S = 1.0


class _StdinLines:
    """The lines of stdin, read by a daemon thread and cut up in the event loop.

    The thread reads a chunk with ``os.read``, queues it, and waits until
    :meth:`read_on` asks for the next, so reading never runs ahead of sending. A thread,
    because the loop cannot watch every kind of stdin (a regular file); a daemon thread
    reading the descriptor itself, so that a client the server has closed exits at once,
    without waiting for a line that may never be typed, and without holding a lock of
    ``sys.stdin``'s that the interpreter's exit would need.
    """

    def __init__(self, events: _Events) -> None:
        # The text typed is decoded as Python decodes stdin (PYTHONIOENCODING counts);
        # --encoding applies to what is sent.
        self.encoding = getattr(sys.stdin, "encoding", None) or locale.getpreferredencoding()
        self._decoder = codecs.getincrementaldecoder(self.encoding)()
        self._partial: list[str] = []
        self._loop = asyncio.get_running_loop()
        self._events = events
        self._go_on = threading.Event()
        threading.Thread(target=self._read, name="netframe-stdin", daemon=True).start()

    def _read(self) -> None:
        while True:
            chunk: bytes | OSError
            try:
                chunk = os.read(0, _STDIN_CHUNK)
            except OSError as exc:
                chunk = exc
            self._go_on.clear()
            try:
                self._loop.call_soon_threadsafe(self._events.put_nowait, chunk)
            except RuntimeError:  # the loop is closed: the client has finished
                return
            if isinstance(chunk, OSError) or not chunk:
                return
            self._go_on.wait()

    def read_on(self) -> None:
        """Let the thread read the next chunk."""
        self._go_on.set()

    def lines(self, chunk: bytes | OSError) -> list[str]:
        """The lines ``chunk`` completes, without their ``\\n`` or ``\\r\\n``.

        ``b""`` is the end of stdin: a last line with no newline is one too.

        Raises:
            ClientError: stdin could not be read.
            InputError: it is not text in its encoding.
        """
        if isinstance(chunk, OSError):
            raise ClientError(f"cannot read stdin: {chunk.strerror or chunk}")
        try:
            text = self._decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            raise InputError(f"cannot read stdin as {self.encoding}: {exc.reason}") from None
        *complete, rest = text.split("\n")
        if complete:
            complete[0] = "".join(self._partial) + complete[0]
            self._partial.clear()
        self._partial.append(rest)
        if not chunk and (last := "".join(self._partial)):
            complete.append(last)
        return [line.removesuffix("\r") for line in complete]


def _watched(printing: Coroutine[Any, Any, None], events: _Events) -> asyncio.Task[None]:
    """Run ``printing`` as a task whose end, however it ends, is queued as ``None``."""
    task = asyncio.create_task(printing)
    task.add_done_callback(lambda _: events.put_nowait(None))
    return task


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it; an error it had already ended with is raised."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.result()


async def open_stream(args: argparse.Namespace) -> TcpClient:
    """The command line's stream connection: TCP to ``HOST:PORT``, or a Unix socket
    when ``args.address`` is a path."""
    tls = args.tls_context  # None without --tls
    if isinstance(args.address, str):
        return await TcpClient.connect_unix(
            args.address, framing=args.framing, timeout_s=args.timeout_s, tls=tls,
            server_name=args.tls_server_name or "localhost",
        )  # fmt: skip
    address: Address = args.address
    return await TcpClient.connect(
        address.host, address.port, framing=args.framing, timeout_s=args.timeout_s, tls=tls,
        server_name=args.tls_server_name,
    )  # fmt: skip


async def interact_tcp(args: argparse.Namespace) -> None:
    async with await open_stream(args) as client:
        replied = asyncio.Event()

        async def print_replies() -> None:
            while (reply := await client.next_reply()) is not None:
                show(reply, args.encoding)
                replied.set()

        # Bare words have no boundary on the wire: two sent back to back would arrive as
        # one message. So in bare framing each line waits for the reply to the one before
        # (at most --timeout), as the tutorial's lock-step client does.
        bare = args.framing != "line"
        awaiting_reply = bare and not args.no_greeting  # the greeting, before the first
        first = True

        events: _Events = asyncio.Queue()
        printing = _watched(print_replies(), events)
        stdin = _StdinLines(events)
        while True:
            chunk = await events.get()
            if chunk is None:  # the server closed the connection (and all was printed)
                printing.result()
                return
            for line in stdin.lines(chunk):
                if client.closed:
                    break
                if bare and not line:  # a bare empty message is nothing
                    continue
                if awaiting_reply:
                    # The greeting comes at once or not at all; a reply may take a while.
                    wait_s = min(client.timeout_s, _GREETING_WAIT_S) if first else client.timeout_s
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(replied.wait(), wait_s)
                first = False
                replied.clear()
                client.send(encode(line, args.encoding))
                awaiting_reply = bare
            await client.drain()
            if not chunk:
                break
            stdin.read_on()
        # The end of stdin: half-close, and print what comes until the server closes,
        # each wait bounded by --timeout.
        client.write_eof()
        await _stop(printing)
        while True:
            try:
                reply = await asyncio.wait_for(client.next_reply(), client.timeout_s)
            except TimeoutError:
                raise ClientError(
                    f"the server did not close within {client.timeout_s:g} s"
                ) from None
            if reply is None:
                return
            show(reply, args.encoding)


async def interact_udp(args: argparse.Namespace) -> None:
    address: Address = args.address
    async with await UdpClient.connect(
        address.host, address.port, timeout_s=args.timeout_s
    ) as client:
        received = sent = 0

        async def print_replies() -> None:
            nonlocal received
            while True:
                reply = await client.next_datagram()
                received += 1
                show(reply.removesuffix(b"\n"), args.encoding)

        events: _Events = asyncio.Queue()
        printing = _watched(print_replies(), events)
        stdin = _StdinLines(events)
        while True:
            chunk = await events.get()
            if chunk is None:  # printing stops only on an error
                printing.result()
                return
            for line in stdin.lines(chunk):
                if not line:  # a blank datagram is no message (netframe drops it unanswered)
                    continue
                ending = "\n" if args.framing == "line" else ""
                client.send(encode(line + ending, args.encoding))
                sent += 1
            if not chunk:
                break
            stdin.read_on()
        # The end of stdin: wait for late replies, until as many came as were sent, or
        # none came for --timeout.
        await _stop(printing)
        while received < sent:
            try:
                reply = await asyncio.wait_for(client.next_datagram(), client.timeout_s)
            except TimeoutError:
                return
            received += 1
            show(reply.removesuffix(b"\n"), args.encoding)
