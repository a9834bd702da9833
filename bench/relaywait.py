#!/usr/bin/env python3
"""How long the trio task waits on the relay thread (shim/relay.py) when it
hands a body over and takes it back, as it does at every stream's start and
end, while the thread relays paced streams.

A forked writer writes one chunk to each of STREAMS engine sockets every
INTERVAL_MS (spread evenly) and drains the client ends; the thread relays
them; the task, meanwhile, hands a spare relay over and takes it back every
millisecond and times each pair. Prints the wait's percentiles in µs and the
events relayed per second. Steadier than the paced streams' delay: no load
client, no engine, no HTTP.

usage: PYTHONPATH=TREE python bench/relaywait.py [--streams 256] [--seconds 5] [--switch-ms MS]
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import sys
import time

import trio

CHUNK = b"40\r\n" + b"data: " + b"x" * 56 + b"\n\n" + b"\r\n"


def writer(engine_ends: list[socket.socket], client_ends: list[socket.socket], interval_s: float,
           seconds: float) -> None:
    n = len(engine_ends)
    poller = select.poll()
    by_fd = {s.fileno(): s for s in client_ends}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    start = time.monotonic()
    sent = 0
    while True:
        now = time.monotonic()
        if now - start > seconds:
            os._exit(0)
        due = int((now - start) / interval_s * n)
        while sent < due:
            try:
                engine_ends[sent % n].send(CHUNK)
            except BlockingIOError:
                pass
            sent += 1
        for fd, _ in poller.poll(interval_s / n * 1000):
            by_fd[fd].recv(65536)


async def main_async(streams: int, seconds: float, interval_s: float) -> int:
    """The writer's pid, to wait for once trio is done."""
    from shim.chunked import whole_chunks_only
    from shim.relay import RELAYS, Relay

    pairs = [socket.socketpair() for _ in range(streams)]  # (engine end, gateway's engine side)
    clients = [socket.socketpair() for _ in range(streams)]  # (gateway's client side, client end)
    for group in (pairs, clients):
        for a, b in group:
            a.setblocking(False)
            b.setblocking(False)
    spare_src, spare_peer = socket.socketpair()
    spare_dst, spare_client = socket.socketpair()
    child = os.fork()
    if child == 0:
        writer([a for a, _ in pairs], [b for _, b in clients], interval_s, seconds + 1)
    relayed = 0

    def step(data: bytes) -> bytes | None:
        nonlocal relayed
        relayed += 1
        return data if whole_chunks_only(data) else None

    for (_, src), (dst, _) in zip(pairs, clients, strict=True):
        RELAYS.hand_over(Relay(src.fileno(), dst.fileno(), step))
    await trio.sleep(1.0)
    waits: list[float] = []
    relayed = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        spare = Relay(spare_src.fileno(), spare_dst.fileno(), step)
        t = time.perf_counter()
        RELAYS.hand_over(spare)
        RELAYS.take_back(spare)
        waits.append((time.perf_counter() - t) * 1e6)
        await trio.sleep(0.001)
    elapsed = time.perf_counter() - t0
    waits.sort()

    def pct(q: float) -> float:
        return waits[min(len(waits) - 1, int(q * len(waits)))]

    print(f"streams {streams}: events/s {relayed / elapsed:,.0f}; hand over + take back, µs: "
          f"p50 {pct(0.5):.1f}  p99 {pct(0.99):.1f}  max {waits[-1]:.1f}  mean {statistics.mean(waits):.1f}  "
          f"(n={len(waits)})")
    del spare_peer, spare_client
    return child


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--interval-ms", type=float, default=25.0)
    ap.add_argument("--switch-ms", type=float, help="sys.setswitchinterval (default: the shim's own)")
    a = ap.parse_args()
    if a.switch_ms is not None:
        sys.setswitchinterval(a.switch_ms / 1000)
    os.waitpid(trio.run(main_async, a.streams, a.seconds, a.interval_ms / 1000), 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
