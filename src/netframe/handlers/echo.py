"""The echo handler: every message goes back to its sender unchanged."""

from __future__ import annotations

from netframe.handlers._interface import Connection, Handler

__all__ = ["EchoHandler"]


class EchoHandler(Handler):
    """Sends each message back byte for byte (with its line ending, in line modes).

    It works on bytes, so any payload, valid text or not, comes back as it was sent.
    """

    __slots__ = ()
    text = False

    def on_message(self, conn: Connection, message: bytes) -> None:
        conn.send(message)
