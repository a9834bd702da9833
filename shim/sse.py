"""Sans-I/O splitter for a server-sent-events body.

Bytes go in as they arrive (any split, even mid-line or mid-character);
complete raw events come out, each with its terminating empty line, so that
passing every event on unchanged reproduces the input byte for byte. Lines may
end in ``\\n`` or ``\\r\\n``; an event ends at the first empty line.
"""

from __future__ import annotations


class SSEDecoder:
    """Split a byte stream into raw SSE events (terminator included)."""

    def __init__(self) -> None:
        self._buf = b""
        # Offset in _buf of the first line not yet looked at, so that a long
        # event arriving in many pieces is scanned once, not once per piece.
        self._scan = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the events completed by them, in order."""
        buf = self._buf + data if self._buf else data
        if self._scan == 0 and b"\r" not in buf and b"\n\n\n" not in buf and not buf.startswith(b"\n"):
            # Fast path for LF framing without stray empty lines, the shape vLLM
            # sends; it splits exactly where the general loop below would.
            if b"\n\n" not in buf:
                self._buf = buf
                return []
            parts = buf.split(b"\n\n")
            self._buf = parts.pop()
            return [p + b"\n\n" for p in parts]
        events: list[bytes] = []
        start = 0
        pos = self._scan
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            if nl == pos or (nl == pos + 1 and buf[pos] == 0x0D):
                # An empty line: the event ends here.
                events.append(buf[start : nl + 1])
                start = nl + 1
            pos = nl + 1
        self._buf = buf[start:]
        self._scan = pos - start
        return events

    @property
    def empty(self) -> bool:
        """Holding no part of an event."""
        return not self._buf

    def whole(self, data: bytes) -> bool:
        """Whether `feed(data)` would return all of data, as events in the
        common shape (LF line ends, single empty lines), holding nothing
        back; then passing data on unchanged is the same as feeding it and
        joining the events. Changes nothing."""
        return (
            not self._buf
            and data.endswith(b"\n\n")
            and not data.startswith(b"\n")
            and b"\r" not in data
            and b"\n\n\n" not in data
        )

    def end(self) -> bytes:
        """The body is finished: return bytes of an unterminated last event."""
        rest, self._buf, self._scan = self._buf, b"", 0
        return rest
