"""Connections from the gateway to the engine: a small keep-alive pool and
the health probe used while the engine starts."""

from __future__ import annotations

import functools
import ipaddress
import select
import socket
import weakref
from dataclasses import dataclass, field

import h11
import trio

from .http1 import UpstreamConnection
from .httpio import next_event, send
from .relay import AnyRelay

# uvicorn (vLLM's HTTP server) closes idle keep-alive connections after 5 s;
# reuse ours only well before that, so a reused one is almost never dead.
POOL_IDLE_S = 4.0
POOL_MAX = 64
# A health probe on loopback answers in well under this, even on a busy box.
HEALTH_PROBE_TIMEOUT_S = 2.0


@functools.cache
def _numeric_family(host: str) -> int | None:
    """The address family of a numeric host, None for a name: parsed once
    per host (3 µs), not at every connection."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to host:port. The engines listen on a numeric address
    (127.0.0.1): one socket and its connect, without trio.open_tcp_stream's
    name lookup and happy-eyeballs tasks (~150 µs of CPU a connection, paid
    for most streams once more of them run at once than the pool keeps)."""
    family = _numeric_family(host)
    if family is None:  # a name: looked up, each of its addresses tried
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)  # with TCP_NODELAY: SSE events must not wait for Nagle


@dataclass(eq=False)
class UpstreamConn:
    stream: trio.SocketStream
    conn: UpstreamConnection = field(default_factory=UpstreamConnection)
    generation: int = 0
    idle_since: float = 0.0
    reused: bool = False
    # the response's headers, and whether its body was relayed raw (past h11)
    # and ended cleanly: then the connection is reusable with a fresh h11 state
    conn_response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    raw_done: bool = False
    # set when the gateway closed it to stop the engine: what to tell the
    # client, and whether a request without an answer yet may be sent again
    cut_reason: str | None = None
    cut_retry: bool = False
    # the body being relayed by the relay thread (shim/relay.py), if it is
    relay: AnyRelay | None = None

    def close(self) -> None:
        if self.relay is not None:  # the relay thread lets go of the socket first
            self.relay.take_back()
        self.stream.socket.close()

    def quiet(self) -> bool:
        """Whether the engine has sent nothing since the last exchange and not
        closed: checked without waiting. Bytes it sent after its response, or
        its close, make the connection unfit for another exchange (those
        bytes would be read as the next answer)."""
        fd = self.stream.socket.fileno()
        if fd < 0:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI | select.POLLRDHUP)
        return not poller.poll(0)


class Upstream:
    """Connections to one engine's port. `reset()` drops every pooled
    connection; call it whenever the engine process changes."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.generation = 0
        self._idle: list[UpstreamConn] = []
        self._busy: weakref.WeakSet[UpstreamConn] = weakref.WeakSet()  # handed out, not back yet

    async def connect(self) -> UpstreamConn:
        now = trio.current_time()
        while self._idle:
            c = self._idle.pop()
            if c.generation == self.generation and now - c.idle_since < POOL_IDLE_S and c.quiet():
                c.reused = True
                self._busy.add(c)
                return c
            c.close()
        c = UpstreamConn(await open_tcp(self.host, self.port), generation=self.generation)
        self._busy.add(c)
        return c

    def release(self, c: UpstreamConn) -> None:
        """Put a connection back after a complete exchange, or close it."""
        self._busy.discard(c)
        if c.raw_done and c.generation == self.generation and len(self._idle) < POOL_MAX:
            c.conn = UpstreamConnection()
            c.raw_done = False
            c.idle_since = trio.current_time()
            c.reused = False
            self._idle.append(c)
            return
        if (
            c.generation == self.generation
            and c.conn.our_state is h11.DONE
            and c.conn.their_state is h11.DONE
            and not c.conn.trailing_data[0]  # bytes past the response: out of step, drop it
            and len(self._idle) < POOL_MAX
        ):
            c.conn.start_next_cycle()
            c.idle_since = trio.current_time()
            c.reused = False
            self._idle.append(c)
        else:
            c.close()

    def reset(self) -> None:
        self.generation += 1
        for c in self._idle:
            c.close()
        self._idle.clear()

    def cut(self, reason: str, *, retry: bool = False) -> int:
        """Close every connection, the ones in use too (their requests fail
        with `reason`, or are sent again where `retry` and no answer had
        come); how many were in use."""
        self.reset()
        cut = 0
        for c in list(self._busy):
            if c.cut_reason is None and c.stream.socket.fileno() != -1:
                c.cut_reason = reason
                c.cut_retry = retry
                c.close()
                cut += 1
        self._busy.clear()
        return cut


async def call(
    host: str, port: int, method: str, path: str, body: bytes | None = None,
    timeout_s: float = HEALTH_PROBE_TIMEOUT_S, unix_path: str | None = None,
) -> tuple[int, bytes] | None:
    """One request on a fresh connection: (status, body), or None when the
    peer does not answer (refused, reset, timeout, broken HTTP)."""
    try:
        with trio.fail_after(timeout_s):
            stream: trio.abc.Stream
            if unix_path is not None:
                stream = await trio.open_unix_socket(unix_path)
            else:
                stream = await open_tcp(host, port)
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                headers = [("host", f"{host}:{port}"), ("connection", "close")]
                if body is not None:
                    headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
                await send(conn, stream, h11.Request(method=method, target=path, headers=headers))
                if body:
                    await send(conn, stream, h11.Data(data=body))
                await send(conn, stream, h11.EndOfMessage())
                status = 0
                chunks: list[bytes] = []
                while True:
                    event = await next_event(conn, stream)
                    if isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        return status, b"".join(chunks)
                    else:
                        return None
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError):
        # refused or reset: not listening yet
        return None


async def probe(host: str, port: int, path: str) -> int | None:
    """GET path once; the status, or None when nothing answers yet."""
    result = await call(host, port, "GET", path)
    return None if result is None else result[0]
