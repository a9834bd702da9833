"""The engine connection pool and the one-shot calls (shim/upstream.py),
against a small HTTP/1.1 server on a free loopback port: reuse after a
whole exchange, never across an engine restart, after idling past uvicorn's
keep-alive or once the engine sent anything unasked; a cut closes the
connections in use and says why."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import pytest
import trio
import trio.testing

from shim.httpio import next_event
from shim.upstream import POOL_IDLE_S, Upstream, UpstreamConn, call, open_tcp, probe

BODY = b'{"ok":true}'


@dataclass
class Engine:
    """Answers every request with 200 and BODY, keeping the connection open;
    `stray` bytes are written after each answer, in their own write."""

    port: int = 0
    connections: int = 0
    stray: bytes = b""
    closing: bool = False  # close each connection after its answer
    answered: trio.Event = field(default_factory=trio.Event)

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                try:
                    event = await next_event(conn, stream)
                except (h11.RemoteProtocolError, trio.BrokenResourceError):
                    return
                if isinstance(event, h11.ConnectionClosed):
                    return
                if not isinstance(event, h11.EndOfMessage):
                    continue
                out = conn.send(h11.Response(status_code=200, headers=[
                    ("content-type", "application/json"), ("content-length", str(len(BODY)))]))
                out += conn.send(h11.Data(data=BODY)) + conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if self.stray:
                    await stream.send_all(self.stray)
                self.answered.set()
                if self.closing or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()


@asynccontextmanager
async def engine_on_a_free_port() -> AsyncIterator[Engine]:
    engine = Engine()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, engine.serve, 0, host="127.0.0.1"))
        engine.port = listeners[0].socket.getsockname()[1]
        yield engine
        nursery.cancel_scope.cancel()


async def exchange(up: Upstream) -> UpstreamConn:
    """One whole request and response on a connection from the pool."""
    c = await up.connect()
    await c.stream.send_all(c.conn.send_request(
        b"GET", b"/health", [(b"host", b"127.0.0.1"), (b"content-length", b"0")], b""))
    status = 0
    while True:
        event = await next_event(c.conn, c.stream)
        if isinstance(event, h11.Response):
            status = event.status_code
        if isinstance(event, h11.EndOfMessage):
            break
    assert status == 200
    return c


async def test_a_connection_is_reused_after_a_whole_exchange() -> None:
    async with engine_on_a_free_port() as engine:
        up = Upstream(engine.port)
        first = await exchange(up)
        up.release(first)
        second = await exchange(up)
        assert second is first and second.reused
        up.release(second)
        assert engine.connections == 1


async def test_no_reuse_across_an_engine_restart() -> None:
    async with engine_on_a_free_port() as engine:
        up = Upstream(engine.port)
        up.release(await exchange(up))
        up.reset()  # the engine process changed
        c = await exchange(up)
        assert not c.reused and engine.connections == 2
        # one handed out before the reset is closed when it comes back
        old_generation = c
        up.reset()
        up.release(old_generation)
        assert old_generation.stream.socket.fileno() == -1


async def test_no_reuse_after_idling_past_the_engines_keep_alive(
        mock_clock: trio.testing.MockClock) -> None:
    async with engine_on_a_free_port() as engine:
        up = Upstream(engine.port)
        first = await exchange(up)
        up.release(first)
        mock_clock.jump(POOL_IDLE_S)
        second = await exchange(up)
        assert second is not first and first.stream.socket.fileno() == -1
        assert engine.connections == 2


async def test_no_reuse_once_the_engine_sent_bytes_nobody_asked_for() -> None:
    async with engine_on_a_free_port() as engine:
        engine.stray = b"HTTP/1.1 200 OK\r\n\r\n"
        up = Upstream(engine.port)
        first = await exchange(up)
        await engine.answered.wait()
        await trio.testing.wait_all_tasks_blocked()
        up.release(first)  # the stray bytes came after the answer, in their own write
        second = await exchange(up)
        assert second is not first and engine.connections == 2


async def test_no_reuse_once_the_engine_closed_it() -> None:
    async with engine_on_a_free_port() as engine:
        engine.closing = True
        up = Upstream(engine.port)
        first = await exchange(up)
        await engine.answered.wait()
        await trio.testing.wait_all_tasks_blocked()
        up.release(first)
        second = await exchange(up)
        assert second is not first and engine.connections == 2


async def test_a_cut_closes_the_connections_in_use_and_says_why() -> None:
    async with engine_on_a_free_port() as engine:
        up = Upstream(engine.port)
        idle = await exchange(up)
        up.release(idle)
        in_use = [await up.connect(), await up.connect()]
        assert up.cut("vllm-gateway: the engine was stopped", retry=True) == 2
        for c in in_use:
            assert c.stream.socket.fileno() == -1
            assert c.cut_reason == "vllm-gateway: the engine was stopped" and c.cut_retry
        assert up.cut("again") == 0  # nothing left in use
        c = await exchange(up)
        assert not c.reused and c.cut_reason is None


async def test_a_call_answers_status_and_body_and_none_where_nothing_answers() -> None:
    async with engine_on_a_free_port() as engine:
        assert await call("127.0.0.1", engine.port, "POST", "/sleep", b"{}") == (200, BODY)
        assert await probe("127.0.0.1", engine.port, "/health") == 200
    with trio.socket.socket() as held:  # bound, never listening, nobody else's: refused
        await held.bind(("127.0.0.1", 0))
        assert await probe("127.0.0.1", held.getsockname()[1], "/health") is None


async def test_a_call_to_a_peer_that_speaks_no_http_is_none() -> None:
    async def garbage(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()
            await stream.send_all(b"SSH-2.0-OpenSSH_9.2\r\n")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, garbage, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        assert await call("127.0.0.1", port, "GET", "/health") is None
        nursery.cancel_scope.cancel()


async def test_connections_are_plain_connects_with_no_delay_and_refusals_leave_no_socket() -> None:
    async with engine_on_a_free_port() as engine:
        for host in ("127.0.0.1", "localhost"):  # a numeric address, and a name (looked up)
            stream = await open_tcp(host, engine.port)
            assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await stream.aclose()
    # a port held (bound, never listening) so that nobody else takes it: refused
    with trio.socket.socket() as held:
        await held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            with pytest.raises(ConnectionRefusedError):
                await open_tcp("127.0.0.1", port)
        assert len(os.listdir("/proc/self/fd")) == before


async def test_an_ipv6_engine_address_is_connected_as_such() -> None:
    listener = trio.socket.socket(socket.AF_INET6)
    try:
        await listener.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    listener.listen()
    stream = await open_tcp("::1", listener.getsockname()[1])
    assert stream.socket.family == socket.AF_INET6
    await stream.aclose()
    listener.close()
