"""The seeds' greeting protocol: ``Welcome!``, then ``Hello, X!`` for each ``X``, until ``exit``."""

from __future__ import annotations

from netframe.handlers._interface import Connection, Handler

__all__ = ["GreetingHandler"]


class GreetingHandler(Handler):
    """Greets each TCP peer with ``Welcome!`` and answers each message ``X`` with ``Hello, X!``.

    The message ``exit`` closes the connection with no reply, over TCP as in the seeds;
    over UDP it is simply not answered.
    """

    __slots__ = ()

    def on_connect(self, conn: Connection) -> None:
        conn.send("Welcome!")

    def on_message(self, conn: Connection, message: str) -> None:
        if message == "exit":
            conn.close()
        else:
            conn.send(f"Hello, {message}!")
