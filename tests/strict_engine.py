"""A strict recording engine for the differential fuzz tier
(tests/test_fuzz_sandbox.py), run by the installed gateway as its engine.

It reads every request with h11 (strict, and no part of the gateway), logs
each one as a JSON line (method, target, request id, body) before it
answers, and answers 200 with the request id echoed: `{"id": ID}`. A
request may ask for a hostile answer with the header `x-hostile: MODE`
(the gateway passes it on): stray bytes after the body, two framings, bad
chunk lines, interim answers first, 101, a body cut short.

usage: strict_engine.py --log FILE [--served-model-name NAME ...] --host H --port P
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Any

import h11
import trio

_LOG: Any = None


def ok(rid: str, extra: dict[str, Any] | None = None) -> bytes:
    body = json.dumps({"id": rid, **(extra or {})}).encode()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    return head + body


def chunked(rid: str) -> bytes:
    body = json.dumps({"id": rid}).encode()
    half = len(body) // 2
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half, body[half:]))


def answer(mode: str, rid: str) -> tuple[list[bytes], bool]:
    """The writes for one answer, and whether to close after them."""
    stray = ok(rid, {"stray": True})
    body = json.dumps({"id": rid}).encode()
    if mode == "chunked":
        return [chunked(rid)], False
    if mode == "stray-same":
        return [ok(rid) + stray], False
    if mode == "stray-after":  # a second write, bound to the end of the answer
        answer = ok(rid)
        return [answer[:-1], answer[-1:] + stray], False
    if mode == "garbage-after":
        answer = ok(rid)
        return [answer[:-1], answer[-1:] + b"\r\nxyz"], False
    if mode == "interim":
        return [b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n" + ok(rid)], False
    if mode == "cl-te":
        return [b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\ntransfer-encoding: chunked\r\n\r\n" % len(body)
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)], False
    if mode == "bad-chunk":
        return [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0x%x\r\n%s\r\n0\r\n\r\n"
                % (len(body), body)], False
    if mode == "bare-lf":
        return [b"HTTP/1.1 200 OK\ncontent-length: %d\n\n" % len(body) + body], False
    if mode == "switch":
        return [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n"
                + ok(rid)], False
    if mode == "truncated":
        return [b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (len(body) + 50) + body], True
    return [ok(rid)], False


def record(req: h11.Request, body: bytes) -> None:
    headers = dict(req.headers)
    line = {"method": req.method.decode(), "target": req.target.decode("latin-1"),
            "id": headers.get(b"x-request-id", b"").decode("latin-1"), "body": body.decode("latin-1"),
            "headers": sorted(n.decode() for n in headers)}
    _LOG.write(json.dumps(line) + "\n")
    _LOG.flush()


async def write_now(fd: int, data: bytes) -> None:
    """One write() system call where the socket takes it all."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)


async def serve(stream: trio.SocketStream) -> None:
    rest = b""
    try:
        while True:
            conn = h11.Connection(h11.SERVER)
            if rest:
                conn.receive_data(rest)
            req: h11.Request | None = None
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data and req is None and not conn.trailing_data[0]:
                        return
                    continue
                if isinstance(event, h11.Request):
                    req = event
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            assert req is not None
            rest = conn.trailing_data[0]
            target = req.target.decode("latin-1")
            if target == "/health":
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                continue
            record(req, body)
            headers = dict(req.headers)
            rid = headers.get(b"x-request-id", b"").decode("latin-1")
            writes, close = answer(headers.get(b"x-hostile", b"ok").decode("latin-1"), rid)
            for piece in writes:  # back to back, no checkpoint between (unless the socket is full)
                await write_now(stream.socket.fileno(), piece)
            if close:
                return
    except (h11.RemoteProtocolError, trio.BrokenResourceError, OSError) as e:
        _LOG.write(json.dumps({"error": str(e)}) + "\n")
        _LOG.flush()
    finally:
        await stream.aclose()


def main() -> None:
    global _LOG
    p = argparse.ArgumentParser()
    p.add_argument("--log", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--served-model-name", nargs="*")
    args = p.parse_args()
    _LOG = open(args.log, "a", encoding="utf-8")  # open for the process's life
    trio.run(functools.partial(trio.serve_tcp, serve, args.port, host=args.host))


if __name__ == "__main__":
    main()
