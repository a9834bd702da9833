"""The gateway's HTTP side over in-memory streams, without systemd or an engine.

Only paths that never forward: the gateway's own answers and its refusals.
An engine stand-in records every call that would start or reach the engine.
"""

from __future__ import annotations

import json
import platform
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
import trio
import trio.testing

from shim import edge, footprint
from shim.config import EngineConfig, GatewayConfig
from shim.engine import Lease
from shim.fleet import Fleet
from shim.learned import Facts
from shim.lifecycle import State
from shim.notify import Notifier
from shim.server import Gateway

MODELS = ("org/model-a", "org/model-b")
# Generous: nothing here waits on anything but the other side of a memory stream.
STEP_S = 5.0


class FakeUpstream:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    async def connect(self) -> Any:
        self.calls.append("upstream.connect")
        raise AssertionError("the engine must not be reached")

    def release(self, conn: Any) -> None:
        self.calls.append("upstream.release")


class FakeEngine:
    """What the gateway (server.py, endpoints.py) uses of shim.engine.Engine;
    anything that would start or reach the engine is recorded in `calls`
    and refused."""

    def __init__(self, cfg: EngineConfig, state: State = State.STOPPED) -> None:
        self.cfg = cfg
        self.state = state
        self.state_since = 1_800_000_000.0
        self.waiting = 0
        self.active = 0
        self.main_pid = 0
        self.last_failure: Any = None
        self.last_error: Any = None
        self.sleep_refused = False
        self.facts = Facts()
        self.last_cold_start_s: float | None = None
        self.last_wake_s: float | None = None
        self.last_sleep_error: str | None = None
        self.sleep_enabled = False
        self.state_seconds: dict[State, float] = {}
        self.busy = 0
        self.idle_since: float | None = 1_800_000_000.0
        self.draining = False
        self.reserved = False
        self.calls: list[str] = []
        self.upstream = FakeUpstream(self.calls)

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    def in_state(self, *states: State) -> bool:
        return self.state in states

    def join_fleet(self, gate: Any, on_drained: Any) -> None:
        pass

    def request_stop(self, cause: str) -> None:
        self.calls.append("request_stop")

    def request_sleep(self, cause: str) -> None:
        self.calls.append("request_sleep")

    async def acquire(self, max_waiting: int) -> float:
        self.calls.append("acquire")
        raise AssertionError("the engine must not be acquired")

    @asynccontextmanager
    async def lease(self, max_waiting: int) -> AsyncIterator[Lease]:
        self.calls.append("lease")
        raise AssertionError("the engine must not be leased")
        yield Lease(self.cfg.name, 0.0, 1)  # pragma: no cover

    async def wait_for(self, *states: State, timeout_s: float) -> bool:
        self.calls.append("wait_for")
        return True

    async def wait_changed(self, timeout_s: float) -> None:
        self.calls.append("wait_changed")


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes = b""
    events: list[Any] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """An h11 client over one end of a memory stream pair."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, body: bytes = b"",
        headers: list[tuple[str, str]] | None = None, *, byte_by_byte: bool = False,
    ) -> Reply:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        hs = [("host", "gateway"), *(headers or [])]
        if body or method == "POST":
            hs.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=hs))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        await self.send(data, byte_by_byte=byte_by_byte)
        return await self.response()

    async def raw(self, data: bytes, *, method: str = "GET") -> Reply | None:
        """Send bytes as they are; the reply, or None when the connection
        closed without one."""
        # Let our h11 believe it sent a request, so that it reads the response.
        self.conn.send(h11.Request(method=method, target="/", headers=[("host", "gateway")]))
        self.conn.send(h11.EndOfMessage())
        await self.send(data)
        return await self.response()

    async def send(self, data: bytes, *, byte_by_byte: bool = False) -> None:
        if byte_by_byte:
            for i in range(len(data)):
                await self.stream.send_all(data[i:i + 1])
        else:
            await self.stream.send_all(data)

    async def response(self) -> Any:
        reply: Reply | None = None
        with trio.fail_after(STEP_S):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    data = await self.stream.receive_some(65536)
                    if not data and reply is None:
                        return None  # closed without a response
                    self.conn.receive_data(data)
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    return reply
                if isinstance(event, h11.Response):
                    reply = Reply(event.status_code, dict(event.headers))
                elif isinstance(event, h11.Data):
                    assert reply is not None
                    reply.body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    assert reply is not None
                    return reply
                if reply is not None:
                    reply.events.append(event)

    async def closed_by_server(self) -> bool:
        """True when the server closed its side (EOF), with nothing more sent."""
        with trio.fail_after(STEP_S):
            return await self.stream.receive_some(65536) == b""


def make_cfg(models: tuple[str, ...] = MODELS) -> GatewayConfig:
    engine = EngineConfig(name="main", command=("vllm", "serve", "m"), models=models)
    return GatewayConfig(engines={"main": engine}, source="config.toml")


@pytest.fixture(autouse=True)
def _no_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)


@asynccontextmanager
async def connected(
    engine_state: State = State.STOPPED, models: tuple[str, ...] = MODELS
) -> AsyncIterator[tuple[Client, FakeEngine, Gateway]]:
    """A gateway handling one connection; after the block, the handler must end."""
    cfg = make_cfg(models)
    engine = FakeEngine(cfg.engine, engine_state)
    gw = Gateway(cfg, Fleet(cfg, {"main": engine}, None), Notifier())  # type: ignore[dict-item]
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.handle, server_stream)
        yield Client(client_stream), engine, gw
        with trio.fail_after(STEP_S):
            await client_stream.send_stream.aclose()  # EOF: the handler ends
    assert gw.connections.open == 0


# ---- the gateway's own endpoints ----


@pytest.mark.parametrize("byte_by_byte", [False, True])
async def test_health(byte_by_byte: bool) -> None:
    async with connected() as (client, engine, _gw):
        reply = await client.request("GET", "/health", byte_by_byte=byte_by_byte)
    assert reply.status == 200
    assert reply.headers[b"content-type"] == b"application/json"
    assert int(reply.headers[b"content-length"]) == len(reply.body)
    assert reply.json() == {"status": "ok", "engine": "stopped"}
    assert engine.calls == []


async def test_health_spelled_differently() -> None:
    async with connected(State.READY) as (client, _engine, _gw):
        reply = await client.request("GET", "//HEALTH/?probe=1")
    assert reply.status == 200
    assert reply.json()["engine"] == "ready"


async def test_status() -> None:
    async with connected() as (client, engine, _gw):
        reply = await client.request("GET", "/gateway/status")
    assert reply.status == 200
    status = reply.json()
    assert status["state"] == "stopped"
    assert status["engine"] == "main"
    assert status["unit"] == "vllm.service"
    assert status["models"] == list(MODELS)
    assert status["in_flight"] == 0
    assert status["waiting"] == 0
    assert status["main_pid"] is None
    assert status["last_error"] is None
    assert engine.calls == []


async def test_models_from_config_while_not_ready() -> None:
    async with connected(State.STARTING) as (client, engine, _gw):
        reply = await client.request("GET", "/v1/models")
    assert reply.status == 200
    listing = reply.json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == list(MODELS)
    assert all(m["object"] == "model" and m["owned_by"] == "vllm-gateway" for m in listing["data"])
    assert engine.calls == []


# ---- refusals ----


def assert_openai_error(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status
    assert reply.headers[b"content-type"] == b"application/json"
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"].startswith("vllm-gateway: ")
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("method", "target"),
    [("GET", "/nope"), ("POST", "/v1/nothing"), ("POST", "/SLEEP/"),
     ("POST", "/%73leep"), ("POST", "/sleep"), ("POST", "/v1/../wake_up"), ("GET", "/%2569s_sleeping"),
     ("POST", "/collective_rpc?x=1"), ("POST", "//reset_prefix_cache//")],
)
async def test_unknown_and_dev_paths_are_404(method: str, target: str) -> None:
    async with connected(State.READY) as (client, engine, _gw):
        reply = await client.request(method, target, b"{}" if method == "POST" else b"")
    error = assert_openai_error(reply, 404)
    assert error["code"] == "not_found"
    assert "no such endpoint" in error["message"]
    assert engine.calls == []


@pytest.mark.parametrize(
    ("method", "target"),
    [("POST", "/health"), ("DELETE", "/v1/models"), ("GET", "/v1/chat/completions"),
     ("PUT", "/v1/completions"), ("GET", "/gateway/start"), ("POST", "/version")],
)
async def test_wrong_method_is_405(method: str, target: str) -> None:
    async with connected() as (client, engine, _gw):
        reply = await client.request(method, target)
    error = assert_openai_error(reply, 405)
    assert f"{method} is not allowed" in error["message"]
    assert engine.calls == []


@pytest.mark.parametrize(
    "body", [b"", b"{", b"not json", b"\xff\xfe", b"[1, 2]", b'"text"', b"null", b'{"model": "x"'],
)
async def test_invalid_json_is_400_without_starting_the_engine(body: bytes) -> None:
    async with connected() as (client, engine, _gw):
        reply = await client.request("POST", "/v1/chat/completions", body)
    assert_openai_error(reply, 400)
    assert engine.calls == []


@pytest.mark.parametrize("target", ["/v1/completions", "/v1/embeddings", "/tokenize"])
async def test_invalid_json_on_other_json_endpoints(target: str) -> None:
    async with connected() as (client, engine, _gw):
        reply = await client.request("POST", target, b"{oops")
    assert_openai_error(reply, 400)
    assert engine.calls == []


async def test_unknown_model_is_404_listing_the_configured_ones() -> None:
    body = json.dumps({"model": "org/other", "messages": []}).encode()
    async with connected() as (client, engine, _gw):
        reply = await client.request("POST", "/v1/chat/completions", body)
    error = assert_openai_error(reply, 404)
    assert "`org/other`" in error["message"]
    assert "org/model-a, org/model-b" in error["message"]
    assert engine.calls == []


async def test_invalid_json_answer_closes_the_connection() -> None:
    async with connected() as (client, engine, _gw):
        first = await client.request("POST", "/v1/chat/completions", b"nope")
        assert first.status == 400
        assert first.headers.get(b"connection") == b"close"
        assert await client.closed_by_server()
    assert engine.calls == []


async def test_body_over_the_limit_is_413(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edge, "MAX_BODY_BYTES", 100)
    body = json.dumps({"model": MODELS[0], "prompt": "x" * 200}).encode()
    async with connected() as (client, engine, _gw):
        reply = await client.request("POST", "/v1/completions", body)
        assert_openai_error(reply, 413)
        assert reply.headers.get(b"connection") == b"close"
        assert await client.closed_by_server()
    assert engine.calls == []


async def test_body_at_the_limit_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    body = b'{"model": "nobody", "prompt": "x"}'
    monkeypatch.setattr(edge, "MAX_BODY_BYTES", len(body))
    async with connected() as (client, _engine, _gw):
        reply = await client.request("POST", "/v1/completions", body)
    assert reply.status == 404  # read whole, then refused for its model


# ---- the connection ----


async def test_keep_alive_serves_two_requests_on_one_connection() -> None:
    async with connected() as (client, engine, _gw):
        first = await client.request("GET", "/health")
        second = await client.request("GET", "/gateway/status")
        third = await client.request("GET", "/nope")
        fourth = await client.request("GET", "/v1/models")
    assert [first.status, second.status, third.status, fourth.status] == [200, 200, 404, 200]
    assert b"connection" not in first.headers
    assert engine.calls == []


async def test_client_closing_at_once_ends_the_handler() -> None:
    async with connected() as (_client, engine, _gw):
        pass
    assert engine.calls == []


# h11 checks its limit once a read leaves the head incomplete, so a head just
# over MAX_HEADER_BYTES may still complete on the next read: make it clearly over.
HUGE_HEAD = (
    b"GET /health HTTP/1.1\r\nhost: gateway\r\nx-big: "
    + b"a" * (3 * edge.MAX_HEADER_BYTES) + b"\r\n\r\n"
)
BAD_HEADS = [
    b"GARBAGE\r\n\r\n",
    b"GET /health\r\n\r\n",
    b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nhost: g\r\ncontent-length: x\r\n\r\n",
]

async def test_huge_headers_are_431_and_closed() -> None:
    async with connected() as (client, engine, _gw):
        reply = await client.raw(HUGE_HEAD)
        closed = await client.closed_by_server()
    assert reply is not None, "the connection closed without a response"
    assert_openai_error(reply, 431)
    assert reply.headers.get(b"connection") == b"close"
    assert closed
    assert engine.calls == []


@pytest.mark.parametrize("head", BAD_HEADS)
async def test_malformed_request_is_400_and_closed(head: bytes) -> None:
    async with connected() as (client, engine, _gw):
        reply = await client.raw(head)
        closed = await client.closed_by_server()
    assert reply is not None, "the connection closed without a response"
    assert_openai_error(reply, 400)
    assert reply.headers.get(b"connection") == b"close"
    assert closed
    assert engine.calls == []


async def test_malformed_body_is_400_and_closed() -> None:
    head = b"POST /v1/completions HTTP/1.1\r\nhost: g\r\ntransfer-encoding: chunked\r\n\r\n"
    async with connected() as (client, engine, _gw):
        reply = await client.raw(head + b"zz\r\n{}\r\n0\r\n\r\n", method="POST")
        assert reply is not None
        error = assert_openai_error(reply, 400)
        assert "malformed HTTP request" in error["message"]
        assert reply.headers.get(b"connection") == b"close"
        assert await client.closed_by_server()
    assert engine.calls == []


@pytest.mark.parametrize("head", [HUGE_HEAD, *BAD_HEADS], ids=["huge", *map(repr, BAD_HEADS)])
async def test_malformed_request_closes_the_connection(head: bytes) -> None:
    # What holds today, with or without the response above: the handler ends
    # and closes, and nothing reaches the engine.
    async with connected() as (client, engine, _gw):
        await client.send(head)
        with trio.fail_after(STEP_S):
            while await client.stream.receive_some(65536):
                pass
    assert engine.calls == []


@pytest.mark.parametrize("target", ["/health", "/gateway/status", "/v1/models"])
async def test_head_on_own_get_endpoints(target: str) -> None:
    async with connected() as (client, engine, _gw):
        reply = await client.request("HEAD", target)
        assert reply.status == 200
        assert reply.body == b""
        again = await client.request("GET", target)
        assert again.status == 200
    assert engine.calls == []


async def test_a_stalled_request_head_gets_408(monkeypatch: pytest.MonkeyPatch,
                                                autojump_clock: object) -> None:
    monkeypatch.setattr(edge, "KEEPALIVE_IDLE_S", 1.0)
    async with connected() as (client, engine, _gw):
        reply = await client.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        assert reply is not None, "the connection closed without a response"
        assert_openai_error(reply, 408)
    assert engine.calls == []


async def test_memory_is_given_back_each_time_the_last_engine_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    # Once per stop, not at every change while stopped: each costs a full
    # collection and a walk of the heap.
    gave: list[State] = []
    cfg = make_cfg()
    engine = FakeEngine(cfg.engine, State.READY)
    gw = Gateway(cfg, Fleet(cfg, {"main": engine}, None), Notifier())  # type: ignore[dict-item]
    monkeypatch.setattr(footprint, "give_back", lambda: gave.append(engine.state))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.status_loop)
        for state, busy, after in [(State.READY, 0, 0), (State.STOPPED, 1, 0), (State.STOPPED, 0, 1),
                                   (State.STOPPED, 0, 1), (State.STARTING, 0, 1), (State.STOPPED, 0, 2)]:
            engine.state, engine.busy = state, busy
            gw.engine_changed()
            await trio.testing.wait_all_tasks_blocked()
            assert len(gave) == after, (state, busy)
        nursery.cancel_scope.cancel()


def test_give_back_runs_here() -> None:
    footprint.give_back()  # glibc: malloc_trim found and called; elsewhere the collection alone
    assert (footprint._malloc_trim() is not None) == (platform.libc_ver()[0] == "glibc")
