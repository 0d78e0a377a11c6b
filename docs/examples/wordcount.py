"""A custom handler: count the words of each message, and keep a running total."""

from netframe import Connection, Handler


class WordCount(Handler):
    """Answers each message with its word count and the total so far; ``bye`` ends."""

    def __init__(self) -> None:
        self.total = 0  # one handler per TCP connection: this is per-connection state

    def on_connect(self, conn: Connection) -> None:
        conn.send("Send me text; bye ends.")

    def on_message(self, conn: Connection, message: str) -> None:
        if message == "bye":
            conn.send(f"{self.total} words in all. Bye!")
            conn.close()
            return
        words = len(message.split())
        self.total += words
        conn.send(f"{words} word{'' if words == 1 else 's'}, {self.total} so far")


if __name__ == "__main__":
    import netframe

    netframe.run(handler=WordCount, framing="line", tcp=["127.0.0.1:9000"], udp=["127.0.0.1:9000"])
