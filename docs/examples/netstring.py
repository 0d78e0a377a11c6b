"""A framer of your own: netstrings (``5:hello,``), as D. J. Bernstein defined them."""

from netframe import Framer


class Netstring(Framer):
    """Messages written ``<length>:<bytes>,``; replies are written the same way."""

    greeting_terminator = b""  # a netstring carries its own end

    def __init__(self, max_message_bytes: int) -> None:
        self.limit = max_message_bytes
        self.buffer = b""
        self.overflow = False

    @property
    def partial(self) -> bytes:  # type: ignore[override]
        return self.buffer  # a message has begun while bytes wait here

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self.buffer += data
        messages = []
        while not self.overflow:
            digits, colon, rest = self.buffer.partition(b":")
            if not colon:
                # Still reading the length: refuse what cannot be one within the limit.
                too_long = len(digits) > len(str(self.limit))
                self.overflow = bool(digits) and (not digits.isdigit() or too_long)
                break
            if not digits.isdigit() or int(digits) > self.limit:
                self.overflow = True
                break
            size = int(digits)
            if len(rest) < size + 1:
                break
            if rest[size : size + 1] != b",":
                self.overflow = True
                break
            messages.append((rest[:size], b""))
            self.buffer = rest[size + 1 :]
        if self.overflow:
            self.buffer = b""
        return messages

    def encode(self, payload: bytes, terminator: bytes) -> bytes:
        return b"%d:%s," % (len(payload), payload)
