"""The proxy in front of a hostile engine, in process: a TCP server that
answers each request with scripted bytes (stray bytes after a body, two
framings, bad chunk lines, 1xx first), and the gateway's real connection
handler and engine pool. Each client must get its own answer or a clean
error, never bytes of another exchange."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

import shim.proxy
import shim.relay
from shim.chunked import ChunkedDecoder
from shim.engine import Lease
from shim.fleet import Fleet
from shim.lifecycle import State
from shim.notify import Notifier
from shim.server import Gateway
from shim.upstream import Upstream
from tests.test_proxy_memory import STEP_S, FakeEngine, make_cfg
from tests.test_toolcalls import client_view

# the request id the client sent, read back from what the engine got
_ID = re.compile(rb"\r\nx-request-id: ([^\r]+)\r\n", re.IGNORECASE)


class ReadyEngine(FakeEngine):
    """A ready engine: requests go to the real pool, to `port`."""

    def __init__(self, port: int) -> None:
        super().__init__(make_cfg().engine, State.READY)
        self.upstream = Upstream(port)  # type: ignore[assignment]

    @asynccontextmanager
    async def lease(self, max_waiting: int) -> AsyncIterator[Lease]:
        yield Lease(self.cfg.name, 0.0, 1)


@dataclass
class Engine:
    """A scripted engine: `answer(request_id, head)` gives the bytes to
    write (a list: one write each, with a checkpoint between; an Event in
    the list is waited for, a number is a pause of that many seconds)."""

    answer: Callable[[bytes, bytes], list[Any]]
    port: int = 0
    heads: list[bytes] = field(default_factory=list)
    connections: int = 0
    fake: ReadyEngine | None = None  # what the gateway sees of the engine

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
                while len(buf) < length:
                    buf += await stream.receive_some(65536)
                buf = buf[length:]
                self.heads.append(head)
                m = _ID.search(head + b"\r\n")
                for piece in self.answer(m.group(1) if m else b"", head):
                    if isinstance(piece, trio.Event):  # the test says when to go on
                        await piece.wait()
                        continue
                    if isinstance(piece, float):
                        await trio.sleep(piece)
                        continue
                    await stream.send_all(piece)
                    await trio.lowlevel.checkpoint()
        except trio.BrokenResourceError:
            return


@asynccontextmanager
async def gateway(
    answer: Callable[[bytes, bytes], list[Any]], read_timeout_s: float | None = None,
    tool_call_format: str | None = None,
) -> AsyncIterator[tuple[Gateway, Engine, int]]:
    engine = Engine(answer)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, engine.serve, 0, host="127.0.0.1"))
        engine.port = listeners[0].socket.getsockname()[1]
        cfg = make_cfg()
        fake = engine.fake = ReadyEngine(engine.port)
        if read_timeout_s is not None:
            fake.cfg = dataclasses.replace(fake.cfg, read_timeout_s=read_timeout_s)
        if tool_call_format is not None:
            fake.cfg = dataclasses.replace(fake.cfg, tool_call_format=tool_call_format)
        gw = Gateway(cfg, Fleet(cfg, {"main": fake}, None), Notifier())  # type: ignore[dict-item]
        front = await nursery.start(functools.partial(trio.serve_tcp, gw.handle, 0, host="127.0.0.1"))
        yield gw, engine, front[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def exchange(port: int, data: bytes) -> bytes:
    """Send, then read until the gateway closes or one whole answer came."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        out = b""
        with trio.fail_after(STEP_S):
            while True:
                if _complete(out):
                    return out
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return out
                out += chunk


def _complete(out: bytes) -> bool:
    head, sep, body = out.partition(b"\r\n\r\n")
    if not sep or head.startswith(b"HTTP/1.1 1"):
        return False
    if head.startswith((b"HTTP/1.1 204", b"HTTP/1.1 304")):
        return True
    m = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
    if m:
        return len(body) >= int(m.group(1))
    return body.endswith(b"0\r\n\r\n")


def chat(request_id: str, extra: bytes = b"") -> bytes:
    body = b'{"model": "org/model-a", "prompt": "x"}'
    return (b"POST /v1/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: " + request_id.encode() + b"\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def ok(request_id: bytes) -> bytes:
    body = json.dumps({"id": request_id.decode()}).encode()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    return head + body


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("stray", [
    b"garbage",
    b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n{\"id\": \"not yours\"}",
])
@pytest.mark.parametrize("same_write", [True, False])
async def test_bytes_after_a_response_never_reach_the_next_client(stray: bytes, same_write: bool) -> None:
    def answer(rid: bytes, head: bytes) -> list[bytes]:
        return [ok(rid) + stray] if same_write else [ok(rid), stray]

    async with gateway(answer) as (_gw, engine, port):
        for i in range(6):
            reply = await exchange(port, chat(f"r{i}"))
            assert status_of(reply) == 200, reply
            assert body_of(reply) == {"id": f"r{i}"}
    assert len(engine.heads) == 6
    assert engine.connections == 6  # no connection with stray bytes was used again


async def test_a_quiet_engine_connection_is_reused() -> None:
    async with gateway(lambda rid, head: [ok(rid)]) as (_gw, engine, port):
        for i in range(3):
            assert body_of(await exchange(port, chat(f"r{i}"))) == {"id": f"r{i}"}
    assert engine.connections == 1


CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
BROKEN = {
    "CL and TE": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n0\r\n\r\n",
    "two lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
    "0x size": CHUNKED + b"0x4c\r\n" + b"a" * 76 + b"\r\n0\r\n\r\n",
    "space before size": CHUNKED + b" 55\r\n" + b"a" * 85 + b"\r\n0\r\n\r\n",
    "bare LF size line": CHUNKED + b"5\nhello\r\n0\r\n\r\n",
    "stray CR size line": CHUNKED + b"5\r\r\nhello\r\n0\r\n\r\n",
    "bare LF head": b"HTTP/1.1 200 OK\ncontent-length: 5\n\nhello",
    "101": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
    "HTTP/2.0": b"HTTP/2.0 200 OK\r\ncontent-length: 0\r\n\r\n",
    "not HTTP": b"hello there\r\n\r\n",
}


@pytest.mark.parametrize("wire", list(BROKEN.values()), ids=list(BROKEN))
async def test_a_broken_answer_is_a_clean_502_and_the_connection_closes(wire: bytes) -> None:
    async with gateway(lambda rid, head: [wire]) as (_gw, engine, port):
        reply = await exchange(port, chat("r1"))
        assert status_of(reply) == 502, reply
        assert b"not valid HTTP" in reply or b"status 101" in reply
        assert body_of(reply)["error"]["type"] == "upstream_error"
        # the request was sent once, and the next one takes a new connection
        assert len(engine.heads) == 1
        await exchange(port, chat("r2"))
        assert engine.connections == 2


async def test_interim_answers_are_skipped() -> None:
    def answer(rid: bytes, head: bytes) -> list[bytes]:
        return [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n" + ok(rid)]

    async with gateway(answer) as (_gw, _engine, port):
        reply = await exchange(port, chat("r1"))
        assert reply.startswith(b"HTTP/1.1 200 "), reply
        assert body_of(reply) == {"id": "r1"}


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_and_no_length_for_204_and_304(status: int) -> None:
    wire = b"HTTP/1.1 %d X\r\ncontent-length: 7\r\nx-a: b\r\n\r\n" % status

    async with gateway(lambda rid, head: [wire]) as (_gw, _engine, port):
        reply = await exchange(port, chat("r1"))
        assert await exchange(port, chat("r2")) == reply  # the connection stayed in step
        head = reply.partition(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 %d" % status)
        assert b"content-length" not in head and b"transfer-encoding" not in head and b"x-a: b" in head


async def test_expect_100_continue_is_answered_by_the_gateway_and_not_forwarded() -> None:
    async with gateway(lambda rid, head: [ok(rid)]) as (_gw, engine, port):
        request = chat("r1", b"Expect: 100-continue\r\n")
        head, _, body = request.partition(b"\r\n\r\n")
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(head + b"\r\n\r\n")
            with trio.fail_after(STEP_S):
                interim = await stream.receive_some(65536)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            await stream.send_all(body)
            out = b""
            with trio.fail_after(STEP_S):
                while not _complete(out):
                    out += await stream.receive_some(65536)
        assert body_of(out) == {"id": "r1"}
        assert b"expect" not in engine.heads[0].lower()


async def test_expect_without_a_key_is_refused_before_the_body() -> None:
    async with gateway(lambda rid, head: [ok(rid)]) as (gw, engine, port):
        gw.cfg = dataclasses.replace(gw.cfg, api_keys=("key-of-eight",))
        head = chat("r1", b"Expect: 100-continue\r\n").partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        reply = await exchange(port, head)
        assert status_of(reply) == 401
        assert engine.heads == []


@pytest.mark.parametrize("tools", [False, True])
async def test_bad_framing_once_streaming_ends_with_an_sse_error_event(tools: bool) -> None:
    first_event_read = trio.Event()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    event = b'data: {"id": "x"}\n\n'

    def answer(rid: bytes, _head: bytes) -> list[Any]:
        return [head + b"%x\r\n%s\r\n" % (len(event), event), first_event_read, b"0x10\r\n"]

    async with gateway(answer, tool_call_format="nemotron" if tools else None) as (_gw, _engine, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(tool_chat("r1") if tools else chat("r1"))
            out = b""
            with trio.fail_after(STEP_S):
                while event not in out:
                    out += await stream.receive_some(65536)
                first_event_read.set()
                while chunk := await stream.receive_some(65536):
                    out += chunk
    assert out.startswith(b"HTTP/1.1 200 ")
    body = out.partition(b"\r\n\r\n")[2]
    assert b'data: {"error": {"message": "vllm-gateway: the engine\'s answer is not valid HTTP: ' in body
    assert body.endswith(b"\r\n0\r\n\r\n")  # the body ends properly, then the connection closes


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def sse_chunk(n: int) -> bytes:
    event = b'data: {"n": %d}\n\n' % n
    return b"%x\r\n%s\r\n" % (len(event), event)


async def read_all(port: int, data: bytes) -> tuple[bytes, float]:
    """Send, then read until the gateway closes or the body ends; the bytes
    and how long it took."""
    t0 = trio.current_time()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        out = b""
        while not out.endswith(b"\r\n0\r\n\r\n") and (chunk := await stream.receive_some(65536)):
            out += chunk
    return out, trio.current_time() - t0


async def silent_engine(tools: bool, timeout_s: float, late_s: float) -> None:
    """Mid-stream silence past read_timeout: an SSE error event, the body's
    proper end, and the engine stopped as hung; never before the timeout,
    and at most a sixteenth of it later (and `late_s` that the machine adds)."""
    never = trio.Event()

    def answer(rid: bytes, _head: bytes) -> list[Any]:
        return [SSE_HEAD + sse_chunk(0), sse_chunk(1), never]

    async with gateway(answer, timeout_s, "nemotron" if tools else None) as (_gw, engine, port):
        out, took = await read_all(port, tool_chat("r1") if tools else chat("r1"))
        assert engine.fake is not None
        assert "request_stop" in engine.fake.calls
    body = out.partition(b"\r\n\r\n")[2]
    assert b'data: {"n": 1}' in body
    assert b"the engine sent nothing for %g s; it is restarted" % timeout_s in body
    assert body.endswith(b"\r\n0\r\n\r\n")
    assert timeout_s <= took <= timeout_s * 17 / 16 + late_s, took


async def paused_engine(tools: bool, timeout_s: float, pause_s: float, pauses: int) -> None:
    """Events `pause_s` apart, longer than read_timeout in all: the timeout
    counts from the last bytes, not from the start of the body."""

    def answer(rid: bytes, _head: bytes) -> list[Any]:
        pieces: list[Any] = [SSE_HEAD + sse_chunk(0)]
        for n in range(1, pauses + 1):
            pieces += [pause_s, sse_chunk(n)]
        return [*pieces, b"0\r\n\r\n"]

    async with gateway(answer, timeout_s, "nemotron" if tools else None) as (_gw, engine, port):
        out, took = await read_all(port, tool_chat("r1") if tools else chat("r1"))
        assert engine.fake is not None
        assert "request_stop" not in engine.fake.calls
    body = out.partition(b"\r\n\r\n")[2]
    assert b"error" not in body
    assert body.count(b"data: ") == pauses + 1 and body.endswith(b"\r\n0\r\n\r\n")
    assert took >= pause_s * pauses > timeout_s


@pytest.mark.parametrize("tools", [False, True])
async def test_a_silent_engine_ends_the_stream_after_its_read_timeout(
    tools: bool, autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shim.proxy, "RELAY_THREAD", False)  # the trio task relays: virtual time
    await silent_engine(tools, 8.0, 0.25)


@pytest.mark.parametrize("tools", [False, True])
async def test_pauses_shorter_than_the_read_timeout_never_cut_a_stream(
    tools: bool, autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shim.proxy, "RELAY_THREAD", False)
    await paused_engine(tools, 4.0, 3.0, 10)


# The same through the relay thread, in real time (it cannot see a mock clock):
# a loaded machine may deschedule the test for a while, so the pauses are a
# small part of the timeout and the bound for lateness is wide; the virtual
# time tests above hold the exact bound.

@pytest.fixture(params=["c", "python"])
def relay_thread(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C relay thread where it was built, and the Python one."""
    if request.param == "c" and not shim.relay.NATIVE:
        pytest.skip("shim/_relay.c is not built")
    monkeypatch.setattr(shim.relay, "NATIVE", request.param == "c")


@pytest.mark.parametrize("tools", [False, True])
@pytest.mark.usefixtures("relay_thread")
async def test_a_silent_engine_ends_a_relayed_stream_after_its_read_timeout(tools: bool) -> None:
    await silent_engine(tools, 1.0, 10.0)


@pytest.mark.parametrize("tools", [False, True])
@pytest.mark.usefixtures("relay_thread")
async def test_pauses_shorter_than_the_read_timeout_never_cut_a_relayed_stream(tools: bool) -> None:
    await paused_engine(tools, 2.0, 0.1, 25)


class SendingRelay:
    """A relay whose thread has just read, whenever it is looked at, and
    hands the body back when `done` is set; it counts the task's waits."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.waits = 0

    @property
    def last_read(self) -> int:
        return time.monotonic_ns()

    async def wait(self) -> None:
        self.waits += 1
        await self.done.wait()

    def take_back(self) -> bool:
        raise AssertionError("a stream that keeps sending was taken back")


async def test_a_relayed_stream_that_keeps_sending_wakes_the_task_once_a_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    # The task looks at the thread's reads only when the read timeout would
    # have fired: 100 s of a stream at an 8 s timeout are 13 looks, not one
    # every half second (the timer's slack), and the timeout stays where the
    # last read puts it.
    timer = shim.proxy._ReadTimer(8.0)
    relay = SendingRelay()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(shim.proxy._wait_relay, relay, timer)
        await trio.sleep(100)
        relay.done.set()
    assert relay.waits == 1 + 100 // 8, relay.waits
    assert timer.scope.deadline == pytest.approx(trio.current_time() + 8.0 + timer.slack_s, abs=0.01)


class HandedBackRelay:
    """A relay that read nothing and that the thread handed back just as the
    read timeout fired: take_back finds it gone, its wake is yet to come."""

    last_read = 0

    def __init__(self) -> None:
        self.waits = 0

    async def wait(self) -> None:
        self.waits += 1
        assert self.waits < 5, "waiting again on an expired deadline"
        await trio.sleep_forever()

    def take_back(self) -> bool:
        return False


async def test_a_relay_handed_back_as_its_timeout_fires_ends_the_wait(
        autojump_clock: trio.testing.MockClock) -> None:
    timer = shim.proxy._ReadTimer(8.0)
    relay = HandedBackRelay()
    await shim.proxy._wait_relay(relay, timer)  # type: ignore[arg-type]
    assert relay.waits == 1
    assert trio.current_time() == pytest.approx(8.0 + timer.slack_s, abs=0.01)


@pytest.mark.usefixtures("relay_thread")
async def test_several_events_in_one_engine_write_are_rewritten_whole() -> None:
    # A busy gateway reads several of the engine's chunks at once; a tool
    # call split over them still becomes one tool call, its text never shown.
    events = [b'data: {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", '
              b'"choices": [{"index": 0, "delta": %s, "logprobs": null, "finish_reason": %s}]}\n\n'
              % (json.dumps(delta).encode(), json.dumps(finish).encode())
              for delta, finish in [({"role": "assistant", "content": ""}, None),
                                    ({"content": "<TOOL"}, None), ({"content": 'CALL>[{"name": "f", '}, None),
                                    ({"content": '"arguments": {"a": 1}}]</TOOLCALL>'}, None),
                                    ({"content": ""}, "stop")]]
    framed = [b"%x\r\n%s\r\n" % (len(e), e) for e in [*events, b"data: [DONE]\n\n"]]

    def answer(rid: bytes, _head: bytes) -> list[Any]:
        return [SSE_HEAD + framed[0], 0.05, b"".join(framed[1:4]), 0.05, b"".join(framed[4:]) + b"0\r\n\r\n"]

    async with gateway(answer, tool_call_format="nemotron") as (_gw, _engine, port):
        with trio.fail_after(STEP_S):
            out, _took = await read_all(port, tool_chat("r1"))
    decoder = ChunkedDecoder()
    content, calls, finish, done = client_view(decoder.feed(out.partition(b"\r\n\r\n")[2]))
    assert decoder.done and done
    assert "TOOLCALL" not in content and finish == "tool_calls"
    assert [(name, json.loads(args)) for _id, name, args in calls] == [("f", {"a": 1})]


def tool_chat(request_id: str) -> bytes:
    """A chat request that offers a tool: its stream goes through the rewriter."""
    body = json.dumps({"model": "org/model-a", "messages": [{"role": "user", "content": "x"}],
                       "stream": True, "tools": [{"type": "function", "function": {"name": "f"}}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: " + request_id.encode() + b"\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)
