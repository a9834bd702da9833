"""Small h11 helpers shared by both sides of the proxy: moving events over
trio streams. Protocol decisions stay in h11; this only moves bytes."""

from __future__ import annotations

from collections.abc import Iterable

import h11
import trio

# Large enough that a streamed response's burst of SSE events is read in one
# call; h11 copies what it is given, so bigger buffers mean fewer loop turns.
READ_BYTES = 65536

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})


async def next_event(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Event | type[h11.PAUSED]:
    """The next event from the peer; reads as needed. EOF becomes ConnectionClosed
    (or h11's RemoteProtocolError for a truncated message)."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(READ_BYTES)
            conn.receive_data(data)  # type: ignore[arg-type]  # h11 takes any bytes-like
            continue
        return event  # type: ignore[return-value]


async def send(conn: h11.Connection, stream: trio.abc.Stream, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


def end_to_end_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers, including any the Connection header names."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for name, value in pairs if name == b"connection"
        for token in value.split(b",")
    }
    return [(n, v) for n, v in pairs if n not in HOP_BY_HOP and n not in named]


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None
