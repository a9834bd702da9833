"""Socket pairs standing in for a relayed body's two connections, for the
relay thread's tests (tests/test_relay.py, tests/test_relay_native.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import trio

# Generous: a loaded machine may deschedule the relay thread for a while.
STEP_S = 5.0

Pairs = tuple[socket.socket, socket.socket, socket.socket, socket.socket]


def socket_pairs() -> Iterator[Pairs]:
    """(engine's end, the gateway's engine socket, the gateway's client socket,
    client's end), closed afterwards: the body of a `pairs` fixture."""
    engine, src = socket.socketpair()
    dst, client = socket.socketpair()
    for s in (src, dst):
        s.setblocking(False)
    yield engine, src, dst, client
    for s in (engine, src, dst, client):
        s.close()


def read_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(STEP_S)
    out = b""
    while len(out) < n:
        out += sock.recv(n - len(out))
    return out


async def assert_left_alone(engine: socket.socket, src: socket.socket) -> None:
    """Taken back, the thread no longer reads the engine's socket: what the
    engine sends next waits there for the task."""
    engine.sendall(b"second")
    with trio.fail_after(STEP_S):
        await trio.lowlevel.wait_readable(src)
    assert src.recv(100) == b"second"
