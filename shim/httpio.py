"""Small helpers shared by both sides of the proxy: moving bytes and h11
events over trio socket streams. Protocol decisions stay in h11 (or
shim/http1.py); this only moves bytes."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable

import h11
import trio

# Large enough that a streamed response's burst of SSE events is read in one
# call; h11 copies what it is given, so bigger buffers mean fewer loop turns.
READ_BYTES = 65536

# (Expect too: the gateway answers `100-continue` itself, before it reads a body.)
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"expect",
})


# Socket calls that succeeded at once, in a row, before one yields to the
# scheduler anyway: a peer that always has data ready must not starve the
# other connections (or the timers) of this thread.
_YIELD_EVERY = 32
_streak = 0
_FOREVER = float("inf")
# Every read lands in this one buffer and is copied out at its size: a
# 64 KiB allocation per read, shrunk to what came, fragments the heap
# (the shim's memory grew by megabytes under load).
_READ_BUFFER = bytearray(READ_BYTES)
_READ_VIEW = memoryview(_READ_BUFFER)


async def receive(stream: trio.abc.Stream, deadline: float = _FOREVER, wait_first: bool = False) -> bytes:
    """Up to READ_BYTES from the stream (b"" at its end).

    For a socket stream it first tries the read at once and waits for the
    socket only when nothing is there: unlike trio's receive_some, a read
    that succeeds at once does not go through the scheduler. `wait_first`
    waits first instead, where data is not expected yet (an answer to what
    was just sent): that saves the read that would find nothing. Passing the
    deadline while waiting raises trio.TooSlowError; the deadline is not
    looked at when data is ready.
    """
    global _streak
    if not isinstance(stream, trio.SocketStream):
        with trio.fail_at(deadline):
            return bytes(await stream.receive_some(READ_BYTES))
    fd = stream.socket.fileno()
    while True:
        if wait_first:
            wait_first = False
        else:
            try:
                data = _READ_VIEW[:os.readv(fd, (_READ_BUFFER,))].tobytes()
            except BlockingIOError:
                pass
            except OSError as e:
                raise _stream_error(fd, e) from e
            else:
                _streak += 1
                if _streak >= _YIELD_EVERY:
                    _streak = 0
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        _streak = 0
        await _wait(trio.lowlevel.wait_readable, fd, deadline)


async def send_all(stream: trio.abc.Stream, data: bytes, deadline: float = _FOREVER) -> None:
    """Write all of data; like trio's send_all, but a write that completes at
    once does not go through the scheduler. Waiting for the peer to read
    past the deadline raises trio.TooSlowError."""
    global _streak
    if not isinstance(stream, trio.SocketStream) or stream.socket.did_shutdown_SHUT_WR:
        with trio.fail_at(deadline):
            await stream.send_all(data)
        return
    fd = stream.socket.fileno()
    view: memoryview | None = None
    sent = 0
    while True:
        try:
            sent += os.write(fd, data if view is None else view[sent:])
        except BlockingIOError:
            pass
        except OSError as e:
            raise _stream_error(fd, e) from e
        if sent >= len(data):
            _streak += 1
            if _streak >= _YIELD_EVERY:
                _streak = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if view is None:
            view = memoryview(data)
        _streak = 0
        await _wait(trio.lowlevel.wait_writable, fd, deadline)


async def _wait(wait: Callable[[int], Awaitable[None]], fd: int, deadline: float) -> None:
    """Wait until the socket is ready; past the deadline, trio.TooSlowError.
    A cancel scope only where there is a deadline to keep."""
    if deadline == _FOREVER:
        await wait(fd)
        return
    with trio.CancelScope(deadline=deadline) as scope:
        await wait(fd)
    if scope.cancelled_caught:
        raise trio.TooSlowError


def _stream_error(fd: int, e: OSError) -> Exception:
    if fd < 0:
        return trio.ClosedResourceError("the socket was closed")
    return trio.BrokenResourceError(str(e))


async def next_event(
    conn: h11.Connection, stream: trio.abc.Stream, deadline: float = _FOREVER, wait_first: bool = False
) -> h11.Event | type[h11.PAUSED]:
    """The next event from the peer; reads as needed. EOF becomes ConnectionClosed
    (or h11's RemoteProtocolError for a truncated message). Waiting past the
    deadline raises trio.TooSlowError. `wait_first`: see `receive`."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await receive(stream, deadline, wait_first))
            wait_first = False
            continue
        return event  # type: ignore[return-value]


async def send(conn: h11.Connection, stream: trio.abc.Stream, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await send_all(stream, data)


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
