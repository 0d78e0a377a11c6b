"""Instructions per message on the Python hot path, netframe against the raw baseline.

    python benchmarks/instructions.py          # needs valgrind (callgrind)
    python benchmarks/instructions.py bare     # only the kinds named (tcp udp session bare echo)

Wall-clock and CPU-time figures on a shared 2-core machine wander by several percent
from run to run; instruction counts do not. Each case feeds messages straight into the
protocol objects with a stand-in transport (no sockets, no loop I/O), runs twice with
different message counts under ``valgrind --tool=callgrind``, and reports the difference
divided by the difference in messages: the cost of one more message, start-up excluded.
What it shows is the Python-level work per message; the real server adds the same
syscall and event-loop cost to both sides.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KINDS = ("tcp", "udp", "session", "bare", "echo")
KIB = bytes(range(256)) * 4  # the echo payload: 1 KiB
CASES = tuple(f"{side}-{kind}" for kind in KINDS for side in ("netframe", "raw"))
PEER = ("127.0.0.1", 50000)


class FakeTransport:
    """Just enough of a transport for the protocols' hot paths."""

    def write(self, data: bytes) -> None: ...
    def sendto(self, data: bytes, addr: Any = None) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return PEER

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...
    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


async def drive(case: str, count: int) -> None:
    sys.path.insert(0, str(HERE / "servers"))
    import _common
    import raw_protocol

    from netframe._endpoint import EndpointContext
    from netframe.config import Config
    from netframe.handlers import resolve_handler
    from netframe.logs import configure_logging, get_logger
    from netframe.tcp import TcpEndpoint
    from netframe.udp import UdpEndpoint

    configure_logging("json", "warning")
    handler = resolve_handler("greeting")
    # The per-source UDP rate limit is off, as in a one-host benchmark; every other
    # guard keeps its default.
    ctx = EndpointContext(Config(framing="line", udp_rate=0), handler, get_logger())
    # The tutorial's own clients: default (auto) framing, bare words.
    auto = EndpointContext(Config(udp_rate=0), handler, get_logger())
    # The echo handler on raw framing, as the comparison suite's echo runs it.
    echo = EndpointContext(Config(framing="raw"), resolve_handler("echo"), get_logger())

    def session(protocol: Any, name: bytes = b"c1\n", exit: bytes = b"exit\n") -> None:
        protocol.connection_made(FakeTransport())
        protocol.data_received(name)
        protocol.data_received(exit)
        protocol.connection_lost(None)

    def tick(context: EndpointContext, every: int) -> None:
        """What the server's tick does for new connections every 0.1 s."""
        if len(context.arrivals) >= every:
            for arrival in context.arrivals:
                arrival.enter_wheel()
            context.arrivals.clear()

    if case == "netframe-tcp":
        tcp = TcpEndpoint(ctx)
        tcp.connection_made(FakeTransport())
        for _ in range(count):
            tcp.data_received(b"c17\n")
    elif case == "raw-tcp":
        raw = raw_protocol.GreetingProtocol()
        raw.connection_made(FakeTransport())
        for _ in range(count):
            raw.data_received(b"c17\n")
    elif case == "netframe-udp":
        udp = UdpEndpoint(ctx, handler())
        udp.connection_made(FakeTransport())
        for _ in range(count):
            udp.datagram_received(b"u1-17", PEER)
    elif case == "raw-udp":
        raw_udp = _common.UdpServer("greeting")
        raw_udp.connection_made(FakeTransport())
        for _ in range(count):
            raw_udp.datagram_received(b"u1-17", PEER)
    elif case == "netframe-session":
        for _ in range(count):
            session(TcpEndpoint(ctx))
            tick(ctx, 100)
    elif case == "raw-session":
        for _ in range(count):
            session(raw_protocol.GreetingProtocol())
    elif case == "netframe-bare":
        for _ in range(count):
            session(TcpEndpoint(auto), b"c1", b"exit")
            tick(auto, 100)
    elif case == "raw-bare":
        for _ in range(count):
            session(raw_protocol.BareGreetingProtocol(), b"c1", b"exit")
    elif case == "netframe-echo":
        echoing = TcpEndpoint(echo)
        echoing.connection_made(FakeTransport())
        for _ in range(count):
            echoing.data_received(KIB)
    elif case == "raw-echo":
        raw_echo = raw_protocol.EchoProtocol()
        raw_echo.connection_made(FakeTransport())
        for _ in range(count):
            raw_echo.data_received(KIB)


def instructions(case: str, count: int) -> int:
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, __file__, "--drive", case, str(count)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    match = re.search(r"Collected : (\d+)", done.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count from valgrind: {done.stderr[-300:]}")
    return int(match.group(1))


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--drive":
        asyncio.run(drive(sys.argv[2], int(sys.argv[3])))
        return 0
    if shutil.which("valgrind") is None:
        print("benchmarks/instructions.py needs valgrind: apt-get install valgrind")
        return 2
    kinds = [kind for kind in KINDS if kind in sys.argv[1:]] or list(KINDS)
    cases = [case for case in CASES if case.partition("-")[2] in kinds]
    low, high = 2_000, 12_000
    per_op = {c: (instructions(c, high) - instructions(c, low)) / (high - low) for c in cases}
    print(f"{'case':<18} {'instructions per message (session)':>36}")
    for case in cases:
        print(f"{case:<18} {per_op[case]:>36,.0f}")
    for kind in kinds:
        print(f"netframe/raw {kind}: {per_op[f'netframe-{kind}'] / per_op[f'raw-{kind}']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
