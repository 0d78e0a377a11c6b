"""The seeds' greeting protocol: ``Welcome!``, then ``Hello, X!`` for each ``X``, until ``exit``."""

from __future__ import annotations

from netframe.handlers._interface import Connection, Handler

__all__ = ["GreetingHandler"]


class GreetingHandler(Handler):
    """Greets each TCP peer with ``Welcome!`` and answers each message ``X`` with ``Hello, X!``.

    The message ``exit`` closes the connection with no reply, over TCP as in the seeds;
    over UDP it is simply not answered.

    Over UDP a datagram that is itself one of this protocol's replies (``Hello, ...!``
    or ``Welcome!``) is not answered either: its source address may be forged to be
    another greeting server's, and two servers answering each other's replies would
    talk forever. Protocols that tell requests from replies (DNS's QR bit, NTP's mode)
    avoid such loops the same way.
    """

    __slots__ = ()

    def on_connect(self, conn: Connection) -> None:
        conn.send("Welcome!")

    def on_message(self, conn: Connection, message: str) -> None:
        if message == "exit":
            conn.close()
        elif conn.network == "udp" and message[-1:] == "!" and _is_reply(message):
            # (message[-1:] rather than endswith, which parses its arguments as a tuple:
            # about 110 fewer instructions on every datagram)
            return
        else:
            conn.send(f"Hello, {message}!")


def _is_reply(message: str) -> bool:
    return message == "Welcome!" or (message.startswith("Hello, ") and message.endswith("!"))
