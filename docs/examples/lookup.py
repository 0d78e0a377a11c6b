"""An async handler: it awaits a (simulated) lookup without blocking other clients."""

import asyncio

from netframe import Connection, Handler

PHONE_BOOK = {"alice": "555-0100", "bob": "555-0199"}


class PhoneLookup(Handler):
    """Answers a name with its number after a slow lookup, in the order asked."""

    async def on_message(self, conn: Connection, message: str) -> None:
        number = await self.find(message.strip().lower())
        conn.send(f"{message}: {number or 'unknown'}")

    async def find(self, name: str) -> str | None:
        await asyncio.sleep(0.01)  # stands for a database or DNS query
        return PHONE_BOOK.get(name)
