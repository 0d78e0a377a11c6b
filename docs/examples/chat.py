"""Shared state and pushes: a chat room that lives as long as the server."""

from typing import ClassVar

import structlog

from netframe import Connection, Handler, Server


class Chat(Handler):
    """Each line goes to everyone else in the room, prefixed with its sender's number."""

    room: ClassVar[dict[int, Connection]] = {}

    @classmethod
    def on_start(cls, server: Server) -> None:
        cls.room = {}  # a database pool would be opened here, and awaited if need be
        structlog.get_logger().info("chat_opened")

    @classmethod
    def on_stop(cls, server: Server) -> None:
        structlog.get_logger().info("chat_closed", members_left=len(cls.room))
        cls.room.clear()

    def on_connect(self, conn: Connection) -> None:
        conn.send(f"Welcome, #{conn.id}! {len(self.room)} others here.")
        self.broadcast(conn, f"#{conn.id} joined from {conn.peer}")
        self.room[conn.id] = conn

    def on_message(self, conn: Connection, message: str) -> None:
        if message == "/quit":
            conn.close()
        else:
            self.broadcast(conn, f"#{conn.id}: {message}")

    def on_disconnect(self, conn: Connection) -> None:
        self.room.pop(conn.id, None)
        self.broadcast(conn, f"#{conn.id} left ({conn.close_reason})")

    def broadcast(self, sender: Connection, text: str) -> None:
        for member in list(self.room.values()):
            if member is not sender:
                member.send(text)  # a push: it answers no message of that member's
