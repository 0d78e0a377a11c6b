"""Baseline: thread-per-connection blocking sockets, the classic tutorial server.

Why it is a fair baseline: it is the model many servers start from (an accept loop, one
``threading.Thread`` per connection doing ``recv``/``sendall``), minus the tutorial's
``time.sleep(1)``, so it shows what threads and the GIL cost rather than an artificial
delay. Replies to one ``recv`` leave in one ``sendall``, as in the asyncio baselines.
``--loop`` is accepted for a uniform command line and ignored. UDP, when asked for, is a
blocking ``recvfrom`` loop in one thread.

    python benchmarks/servers/threaded.py --host 127.0.0.1 --port 0 \\
        --handler greeting|echo [--loop asyncio|uvloop] [--udp-port PORT]
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType

from _common import (
    BACKLOG,
    READ_SIZE,
    WELCOME,
    announce,
    greet_datagram,
    greet_lines,
    parse_args,
)


def echo(conn: socket.socket) -> None:
    while data := conn.recv(READ_SIZE):
        conn.sendall(data)


def greeting(conn: socket.socket) -> None:
    conn.sendall(WELCOME)
    buffer = b""
    while data := conn.recv(READ_SIZE):
        replies, buffer, done = greet_lines(buffer + data if buffer else data)
        if replies:
            conn.sendall(replies)
        if done:
            return


def serve_connection(conn: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    with conn, contextlib.suppress(OSError):
        handle(conn)


def serve_udp(sock: socket.socket, greet: bool) -> None:
    while True:
        data, addr = sock.recvfrom(READ_SIZE)
        reply = greet_datagram(data) if greet else data
        if reply is not None:
            sock.sendto(reply, addr)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> None:
    options = parse_args(__doc__)
    handle = greeting if options.handler == "greeting" else echo
    family = socket.getaddrinfo(options.host, None)[0][0]
    try:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        with socket.create_server(
            (options.host, options.port), family=family, backlog=BACKLOG
        ) as server:
            udp_port = -1
            if options.udp_port is not None:
                udp = socket.socket(family, socket.SOCK_DGRAM)
                udp.bind((options.host, options.udp_port))
                udp_port = udp.getsockname()[1]
                greet = options.handler == "greeting"
                threading.Thread(target=serve_udp, args=(udp, greet), daemon=True).start()
            announce(server.getsockname()[1], udp_port)
            while True:
                conn, _ = server.accept()
                threading.Thread(target=serve_connection, args=(conn, handle), daemon=True).start()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
