#!/usr/bin/env python3
"""Load client for the benchmarks: keep-alive HTTP/1.1 over raw asyncio sockets.

Each of `--conns` connections sends one request, reads the whole response and
sends the next, for `--duration` seconds (after `--warmup` seconds whose
results are dropped). Responses are framed by Content-Length or chunked
encoding; nothing else is parsed, so the client stays cheap.

  chat    POST a small non-streaming chat completion; prints requests/s and
          latency percentiles (request written -> response complete)
  stream  POST a streaming one; counts SSE events (`data:` lines, [DONE]
          included) and prints events/s and time to first event (request
          written -> first byte of the first event)

  paced   POST a streaming one that the stand-in engine (bench/upstream.py)
          answers at a GPU's pace: `--events` events, `--interval-ms` apart,
          each its own chunk stamped with its send time. The connections
          start within one interval (`--starts together`, the default), so
          their streams end and start again in waves of `--conns` requests
          at once; `--starts spread` spreads them over one whole stream, so
          that requests arrive evenly. The measured window begins once every
          connection has started. Prints events/s achieved and offered,
          the delay each event gained between the engine's write and this
          client's read (p50, p99, max), time to first event, errors (a
          status other than 200, a stream cut short or with the wrong
          number of events) and stalls (a gap of more than STALL_MS, or
          four intervals if longer, between two events of a stream, or
          before the first); with `--cpu-pid`, that process's CPU time per
          event and its share of one core.

With `--cpu-pid PID`, also the CPU time (user + system, from /proc) that
process spent per completed request in the measured window: the proxy's own
cost, steadier than throughput on a shared machine.

Prints one JSON object. usage: load.py chat|stream|paced --url http://H:P --conns N --duration S
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import socket
import sys
import time
from urllib.parse import urlsplit

CHAT = {"model": "bench", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
# Offered to the model with --tools: a gateway that rewrites tool calls only
# looks at responses to requests that offer tools.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


# A paced stream's gap between events that counts as a stall (at least four
# intervals): far beyond scheduling noise, short of a client's timeout.
STALL_MS = 100.0
_SENT = re.compile(rb'"sent_ns":(\d+)\}')


def request_bytes(host: str, port: int, stream: bool, tools: bool = False, pace: str = "") -> bytes:
    body = json.dumps(
        {**CHAT, **({"tools": TOOLS} if tools else {}), "stream": stream}, separators=(",", ":")
    ).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nAccept: */*\r\n"
        + (f"x-bench-pace: {pace}\r\n" if pace else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


class Stats:
    def __init__(self) -> None:
        self.recording = False
        self.done = 0
        self.errors = 0
        self.events = 0
        self.latencies: list[float] = []
        self.ttfe: list[float] = []
        self.delays_ns: list[int] = []
        # the same delays split: each stream's first event (queued behind the
        # gateway's work on the request) and the events after it (the relay)
        self.first_delays_ns: list[int] = []
        self.later_delays_ns: list[int] = []
        self.stalls = 0


class Conn(asyncio.Protocol):
    """One keep-alive connection that sends `req` again as each response ends."""

    def __init__(self, req: bytes, stats: Stats, lost: asyncio.Future[None]) -> None:
        self.req = req
        self.stats = stats
        self.lost = lost
        self.transport: asyncio.Transport | None = None
        self.stopping = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send()

    def send(self) -> None:
        self.head = b""
        self.in_body = False
        self.length: int | None = None  # Content-Length, or None for chunked
        self.got = 0
        self.tail = b""
        self.first_event = False
        self.events = 0
        self.t0 = time.perf_counter()
        assert self.transport is not None
        self.transport.write(self.req)

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.in_body = True
            self.ok = head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200")
            low = head.lower()
            i = low.find(b"\r\ncontent-length:")
            if i >= 0:
                self.length = int(low[i + 17 :].split(b"\r\n", 1)[0])
        seen = self.tail + data
        n = seen.count(b"data:")
        if n:
            if not self.first_event:
                self.first_event = True
                self.ttfe = time.perf_counter() - self.t0
            self.events += n
        self.tail = seen[-8:]
        if self.length is not None:
            self.got += len(data)
            finished = self.got >= self.length
        else:
            finished = seen.endswith(b"\r\n0\r\n\r\n") or (self.got == 0 and data == b"0\r\n\r\n")
            self.got += len(data)
        if finished:
            self.finish()

    def finish(self) -> None:
        st = self.stats
        if st.recording:
            if self.ok:
                st.done += 1
                st.latencies.append(time.perf_counter() - self.t0)
                if self.first_event:
                    st.ttfe.append(self.ttfe)
            else:
                st.errors += 1
        if self.stopping:
            assert self.transport is not None
            self.transport.close()
            return
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class StreamConn(Conn):
    def finish(self) -> None:
        if self.stats.recording:
            self.stats.events += self.events
            self.events = 0
        super().finish()


class PacedConn(Conn):
    """A paced stream: each event's delay is its arrival here less the send
    time the engine stamped in it."""

    def __init__(self, req: bytes, stats: Stats, lost: asyncio.Future[None], events: int,
                 stall_ns: int, start_after_s: float) -> None:
        super().__init__(req, stats, lost)
        self.expected = events
        self.stall_ns = stall_ns
        self.start_after_s = start_after_s
        self.buf = b""
        self.last_ns = 0
        self.seen = 0  # events of this stream read so far

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        asyncio.get_running_loop().call_later(self.start_after_s, self.send)

    def send(self) -> None:
        self.buf = b""
        self.seen = 0
        self.last_ns = time.monotonic_ns()
        super().send()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        st = self.stats
        buf = self.buf + data if self.buf else data
        end = 0
        for m in _SENT.finditer(buf):
            if st.recording:
                delay = now - int(m.group(1))
                st.delays_ns.append(delay)
                (st.later_delays_ns if self.seen else st.first_delays_ns).append(delay)
                if now - self.last_ns > self.stall_ns:
                    st.stalls += 1
            self.last_ns = now
            self.seen += 1
            end = m.end()
        if end:
            self.buf = buf[end:]
        elif len(buf) > 4096:
            self.buf = buf[-64:]
        else:
            self.buf = buf
        super().data_received(data)

    def finish(self) -> None:
        st = self.stats
        if st.recording:
            st.events += self.events
            if self.ok and self.events != self.expected:
                st.errors += 1
        self.events = 0
        if self.ok and self.last_ns and time.monotonic_ns() - self.last_ns > self.stall_ns and st.recording:
            st.stalls += 1  # a long wait for the end
        super().finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stopping and self.stats.recording:
            self.stats.errors += 1  # cut off mid-stream
        super().connection_lost(exc)


async def run(
    mode: str, url: str, conns: int, duration: float, warmup: float, tools: bool = False,
    cpu_pid: int | None = None, events: int = 50, interval_ms: float = 25.0, starts: str = "together",
) -> dict[str, object]:
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    pace = f"{events}/{interval_ms:g}" if mode == "paced" else ""
    req = request_bytes(host, port, mode != "chat", tools, pace)
    stats = Stats()
    loop = asyncio.get_running_loop()
    protos: list[Conn] = []
    stall_ns = round(max(STALL_MS, 4 * interval_ms) * 1e6)
    # the span over which paced connections start: one stream, or one interval
    span_s = (events if starts == "spread" else 1) * interval_ms / 1000
    for i in range(conns):
        lost: asyncio.Future[None] = loop.create_future()
        factory: functools.partial[Conn]
        if mode == "paced":
            factory = functools.partial(PacedConn, req, stats, lost, events, stall_ns,
                                        i * span_s / conns)
        else:
            factory = functools.partial(StreamConn if mode == "stream" else Conn, req, stats, lost)
        _, proto = await loop.create_connection(factory, host, port)
        protos.append(proto)
    await asyncio.sleep(max(warmup, span_s) if mode == "paced" else warmup)
    stats.recording = True
    t0 = time.perf_counter()
    cpu0 = cpu_seconds(cpu_pid) if cpu_pid else 0.0
    await asyncio.sleep(duration)
    cpu = cpu_seconds(cpu_pid) - cpu0 if cpu_pid else 0.0
    elapsed = time.perf_counter() - t0
    dropped = 0
    for p in protos:
        p.stopping = True
        if p.transport is not None and p.transport.is_closing():
            dropped += 1
    stats.recording = False
    for p in protos:
        if p.transport is not None:
            p.transport.close()
    ms = 1000.0
    result: dict[str, object] = {
        "mode": mode,
        "conns": conns,
        **({"starts": starts} if mode == "paced" else {}),
        "duration_s": round(elapsed, 3),
        "requests": stats.done,
        "errors": stats.errors,
        "closed_by_server": dropped,
        "rps": stats.done / elapsed,
        "p50_ms": (percentile(stats.latencies, 50) or 0) * ms,
        "p99_ms": (percentile(stats.latencies, 99) or 0) * ms,
    }
    if cpu_pid and stats.done:
        result["cpu_us_per_request"] = cpu / stats.done * 1e6
    if mode == "paced":
        delays = [d / 1e6 for d in stats.delays_ns]
        result.update(
            {
                "events": len(delays),
                "events_per_s": len(delays) / elapsed,
                "offered_per_s": conns * 1000 / interval_ms,
                "delay_p50_ms": percentile(delays, 50) or 0,
                "delay_p99_ms": percentile(delays, 99) or 0,
                "delay_max_ms": max(delays, default=0),
                "first_delay_p99_ms": (percentile(stats.first_delays_ns, 99) or 0) / 1e6,
                "later_delay_p99_ms": (percentile(stats.later_delays_ns, 99) or 0) / 1e6,
                "ttfe_p50_ms": (percentile(stats.ttfe, 50) or 0) * ms,
                "ttfe_p99_ms": (percentile(stats.ttfe, 99) or 0) * ms,
                "stalls": stats.stalls,
            }
        )
        if cpu_pid:
            result["cpu_us_per_event"] = cpu / len(delays) * 1e6 if delays else 0
            result["cpu_core_pct"] = cpu / elapsed * 100
    if mode == "stream":
        result.update(
            {
                "events": stats.events,
                "events_per_s": stats.events / elapsed,
                "ttfe_p50_ms": (percentile(stats.ttfe, 50) or 0) * ms,
                "ttfe_p99_ms": (percentile(stats.ttfe, 99) or 0) * ms,
            }
        )
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["chat", "stream", "paced"])
    p.add_argument("--url", required=True)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--tools", action="store_true", help="offer a tool in every request")
    p.add_argument("--cpu-pid", type=int, help="report this process's CPU time per request")
    p.add_argument("--events", type=int, default=50, help="paced: events per stream, [DONE] included")
    p.add_argument("--interval-ms", type=float, default=25.0, help="paced: between two events of a stream")
    p.add_argument("--starts", choices=["spread", "together"], default="together",
                   help="paced: connections start over one stream, or within one interval")
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a.mode, a.url, a.conns, a.duration, a.warmup, a.tools, a.cpu_pid,
                                     a.events, a.interval_ms, a.starts))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
