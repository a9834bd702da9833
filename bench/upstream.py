#!/usr/bin/env python3
"""A stand-in upstream that answers as fast as it can: the benchmarks' engine.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length request bodies) to
answer the paths a gateway calls, with replies rendered once at start-up:

  GET  /health                 200, empty
  GET  /v1/models              a one-model list
  POST /v1/chat/completions    a small fixed chat.completion, or with
                               "stream": true, --events chunks in vLLM's
                               chat.completion.chunk shape (one HTTP chunk
                               each), then `data: [DONE]`; no pacing

A streamed request with the header `x-bench-pace: EVENTS/INTERVAL_MS` is
answered at a GPU's pace instead: EVENTS events (the first at once, [DONE]
last), each its own HTTP chunk written on its own, INTERVAL_MS apart on a
fixed schedule, each carrying the time it was written (`"sent_ns"`,
CLOCK_MONOTONIC in ns, the clock every process on the machine shares).

Every reply is one write of prepared bytes, so the upstream costs little
next to whatever sits in front of it. `--procs N` forks N processes that
share the port through SO_REUSEPORT. It takes vLLM's `--host`/`--port` and
ignores other flags, so a gateway can start it as its engine.

usage: upstream.py [--host H] [--port P] [--events N] [--procs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from typing import ClassVar

MODEL = "bench"
_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CONN_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
_PACE = re.compile(rb"\r\nx-bench-pace:[ \t]*(\d+)/(\d+(?:\.\d+)?)", re.IGNORECASE)
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _response(status: str, ctype: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
    )


def render(events: int) -> dict[str, bytes]:
    completion = {
        "id": "chatcmpl-bench0123456789",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! This is the benchmark's fixed reply.",
                    "tool_calls": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 12, "total_tokens": 22, "completion_tokens": 10},
    }

    def chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
        obj = {
            "id": "chatcmpl-bench0123456789",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    words = "The quick brown fox jumps over the lazy dog and then rests".split()
    sse = [chunk({"role": "assistant", "content": ""})]
    sse += [chunk({"content": " " + words[i % len(words)]}) for i in range(max(events - 3, 0))]
    sse += [chunk({"content": ""}, "stop"), b"data: [DONE]\n\n"]
    stream = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in sse) + b"0\r\n\r\n"
    return {
        "health": b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        "models": _response(
            "200 OK",
            "application/json",
            json.dumps(
                {
                    "object": "list",
                    "data": [{"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "vllm"}],
                }
            ).encode(),
        ),
        "chat": _response("200 OK", "application/json", json.dumps(completion).encode()),
        "stream": _STREAM_HEAD + stream,
        "not_found": _response("404 Not Found", "application/json", b'{"detail":"Not Found"}'),
    }


def paced_event(i: int, events: int) -> tuple[bytes, bytes]:
    """The bytes of a paced stream's event `i` around its send time: the
    first has the role, the last two the finish and [DONE]."""
    if i == events - 1:
        return b"data: [DONE]\n\n", b""
    if i == 0:
        delta: dict[str, object] = {"role": "assistant", "content": ""}
    elif i == events - 2:
        delta = {"content": ""}
    else:
        delta = {"content": " word"}
    obj = {
        "id": "chatcmpl-bench0123456789",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": "stop" if i == events - 2 else None,
            }
        ],
        "sent_ns": 0,
    }
    text = json.dumps(obj, separators=(",", ":")).encode()
    before, _, after = text.partition(b'"sent_ns":0')
    return b"data: " + before + b'"sent_ns":', after + b"\n\n"


class PacedStream:
    """One paced answer: each event written on its own, on a fixed schedule
    from the request's arrival (late writes do not push the later ones)."""

    def __init__(self, transport: asyncio.Transport, events: int, interval_s: float) -> None:
        self.transport = transport
        self.parts = [paced_event(i, events) for i in range(events)]
        self.interval_s = interval_s
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.i = 0
        transport.write(_STREAM_HEAD)
        self.send()

    def send(self) -> None:
        if self.transport.is_closing():
            return
        before, after = self.parts[self.i]
        event = before + (b"%d" % time.monotonic_ns() if after else b"") + after
        self.i += 1
        last = self.i == len(self.parts)
        self.transport.write(b"%x\r\n%s\r\n" % (len(event), event) + (b"0\r\n\r\n" if last else b""))
        if not last:
            self.loop.call_at(self.t0 + self.i * self.interval_s, self.send)


class Upstream(asyncio.Protocol):
    replies: ClassVar[dict[str, bytes]] = {}

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        close = False
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[: end + 2]
            m = _CONTENT_LENGTH.search(head)
            size = int(m.group(1)) if m else 0
            if len(buf) < end + 4 + size:
                break
            body = buf[end + 4 : end + 4 + size]
            buf = buf[end + 4 + size :]
            line = head[: head.find(b"\r\n")]
            method, _, rest = line.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            r = self.replies
            if path == b"/v1/chat/completions" and method == b"POST":
                stream = _STREAM_TRUE.search(body) is not None
                pace = _PACE.search(head) if stream else None
                if pace is not None:  # the next request on this connection follows its end
                    assert self.transport is not None
                    if out:
                        self.transport.write(b"".join(out))
                        out.clear()
                    PacedStream(self.transport, max(2, int(pace.group(1))), float(pace.group(2)) / 1000)
                    continue
                out.append(r["stream"] if stream else r["chat"])
            elif path == b"/health":
                out.append(r["health"])
            elif path == b"/v1/models":
                out.append(r["models"])
            else:
                out.append(r["not_found"])
            if _CONN_CLOSE.search(head):
                close = True
                break
        self.buf = buf
        assert self.transport is not None
        if out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        if close:
            self.transport.close()


def serve(sock: socket.socket) -> None:
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def main() -> None:
        server = await loop.create_server(Upstream, sock=sock, backlog=4096)
        async with server:
            await stop.wait()

    loop.run_until_complete(main())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--events", type=int, default=100, help="SSE events per stream, [DONE] included")
    p.add_argument("--procs", type=int, default=1)
    args, _unknown = p.parse_known_args()
    Upstream.replies = render(args.events)

    def listener() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((args.host, args.port))
        s.listen(4096)
        s.setblocking(False)
        return s

    children = []
    for _ in range(args.procs - 1):
        pid = os.fork()
        if pid == 0:
            serve(listener())
            os._exit(0)
        children.append(pid)
    try:
        print(
            f"upstream listening on {args.host}:{args.port} ({args.procs} procs)", file=sys.stderr, flush=True
        )
        serve(listener())
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
