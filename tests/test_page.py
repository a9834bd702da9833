"""The status page and its event stream, over in-memory streams: the files and
their headers, keys, live updates, and that open pages cost nothing while
nothing changes and never start an engine."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing

from shim import page as page_module
from shim.config import EngineConfig, GatewayConfig
from shim.events import ColdStart
from shim.fleet import Fleet
from shim.lifecycle import State
from shim.notify import Notifier
from shim.page import EVENTS_PATH, FILES, KEEPALIVE_S, MAX_STREAMS, check_reader
from shim.requestring import RING_SIZE, RequestRecord, RequestRing
from shim.routes import Kind, classify
from shim.server import Gateway
from tests.test_proxy_memory import STEP_S, Client, FakeEngine

REPO = Path(__file__).resolve().parent.parent
API_KEY = "sk-page-0123456789"
ADMIN_KEY = "admin-page-0123456789"


class FakeSystemd:
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def memory_current(self, unit: str) -> int | None:
        self.asked.append(unit)
        return 123 * 2**20


class PageEngine(FakeEngine):
    def __init__(self, cfg: EngineConfig, state: State = State.STOPPED) -> None:
        super().__init__(cfg, state)
        self.systemd = FakeSystemd()


def make_cfg(**gateway: Any) -> GatewayConfig:
    engine = EngineConfig(name="main", command=("vllm", "serve", "m"), models=("tiny",))
    return GatewayConfig(engines={"main": engine}, source="config.toml", **gateway)


@pytest.fixture(autouse=True)
def _no_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)


@asynccontextmanager
async def gateway(state: State = State.STOPPED, **cfg: Any) -> AsyncIterator[tuple[Gateway, PageEngine]]:
    config = make_cfg(**cfg)
    engine = PageEngine(config.engine, state)
    gw = Gateway(config, Fleet(config, {"main": engine}, None), Notifier())  # type: ignore[dict-item]
    yield gw, engine


@asynccontextmanager
async def connection(gw: Gateway, nursery: trio.Nursery) -> AsyncIterator[Client]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(gw.handle, server_stream)
    try:
        yield Client(client_stream)
    finally:
        with trio.fail_after(STEP_S):
            await client_stream.send_stream.aclose()


class Stream:
    """The client end of an event stream: its head, then SSE events."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.buffer = b""
        self.status = 0
        self.headers: dict[bytes, bytes] = {}

    async def open(self, headers: list[tuple[str, str]] | None = None) -> None:
        c = self.client
        data = c.conn.send(h11.Request(method="GET", target=EVENTS_PATH,
                                       headers=[("host", "gateway"), *(headers or [])]))
        data += c.conn.send(h11.EndOfMessage())
        await c.stream.send_all(data)
        while True:
            event = await self._next()
            if isinstance(event, h11.Response):
                self.status = event.status_code
                self.headers = dict(event.headers)
                return

    async def _next(self) -> Any:
        c = self.client
        while True:
            event = c.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            c.conn.receive_data(await c.stream.receive_some(65536))

    async def event(self) -> tuple[str, Any]:
        """The next SSE event or comment: ("status", snapshot) or (":", text)."""
        while b"\n\n" not in self.buffer:
            event = await self._next()
            if isinstance(event, h11.Data):
                self.buffer += bytes(event.data)
            else:
                raise AssertionError(f"the stream ended: {event!r}")
        block, self.buffer = self.buffer.split(b"\n\n", 1)
        text = block.decode()
        if text.startswith(":"):
            return ":", text
        lines = dict(line.split(": ", 1) for line in text.split("\n"))
        return lines["event"], json.loads(lines["data"])

    async def body(self) -> bytes:
        """The rest of a finite answer (an error)."""
        out = b""
        while not isinstance(event := await self._next(), h11.EndOfMessage):
            out += bytes(event.data)
        return out


# ---- the files ----


@pytest.mark.parametrize("path", ["/gateway/", "/gateway", "/gateway/app.js", "/gateway/app.css",
                                  "/gateway/favicon.svg"])
async def test_files_are_served_under_a_strict_policy(path: str) -> None:
    async with gateway() as (gw, engine), trio.open_nursery() as nursery, connection(gw, nursery) as c:
        reply = await c.request("GET", path)
        assert reply.status == 200
        csp = reply.headers[b"content-security-policy"].decode()
        for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'",
                          "connect-src 'self'", "frame-ancestors 'none'", "base-uri 'none'",
                          "form-action 'none'"):
            assert directive in csp
        assert "unsafe" not in csp
        assert reply.headers[b"x-content-type-options"] == b"nosniff"
        assert int(reply.headers[b"content-length"]) == len(reply.body) > 100 or path.endswith(".svg")
        assert reply.headers[b"connection"] == b"close"  # no idle connection holds the shim up
    for method, headers in (("GET", [("if-none-match", reply.headers[b"etag"].decode())]), ("HEAD", [])):
        async with gateway() as (gw, engine), trio.open_nursery() as nursery, connection(gw, nursery) as c:
            again = await c.request(method, path, headers=headers)
            assert again.status == (304 if headers else 200) and again.body == b""
    assert engine.calls == []


async def test_the_page_refers_only_to_its_own_files() -> None:
    async with gateway() as (gw, _), trio.open_nursery() as nursery, connection(gw, nursery) as c:
        html = (await c.request("GET", "/gateway/")).body.decode()
    assert "<script src=\"/gateway/app.js\"" in html
    assert "http:" not in html and "https:" not in html  # no CDN
    assert "style=" not in html and "<style" not in html  # CSP: no inline style
    assert "onclick" not in html and "<script>" not in html  # CSP: no inline script
    js = (REPO / "shim" / "static" / "app.js").read_text()
    assert "EventSource" not in js.replace("EventSource cannot", "")  # keys go in a header
    assert "innerHTML" not in js  # data goes in as text, never as markup
    assert "setInterval(tick" in js and "setInterval(connect" not in js  # no polling


def test_every_page_path_is_routed_to_the_page() -> None:
    for path in FILES:
        assert classify("GET", path).kind is Kind.PAGE
    assert classify("GET", "/gateway/").kind is Kind.PAGE
    assert classify("GET", EVENTS_PATH).kind is Kind.EVENTS
    assert classify("POST", EVENTS_PATH).kind is Kind.METHOD_NOT_ALLOWED
    assert classify("GET", "/gateway/other.js").kind is Kind.NOT_FOUND


def test_an_installed_package_ships_the_page(tmp_path: Path) -> None:
    # what a wheel (and so `pip install`) takes of the package: setuptools' build_py
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                    "--build-lib", str(tmp_path)], cwd=REPO, check=True, timeout=300,
                   capture_output=True)
    for name, _ in FILES.values():
        assert (tmp_path / "shim" / "static" / name).read_bytes() == \
            (REPO / "shim" / "static" / name).read_bytes()


# ---- the event stream ----


async def test_the_stream_shows_changes_without_starting_anything() -> None:
    async with gateway() as (gw, engine), trio.open_nursery() as nursery, connection(gw, nursery) as c:
        stream = Stream(c)
        await stream.open()
        assert stream.status == 200
        assert stream.headers[b"content-type"] == b"text/event-stream"
        name, snap = await stream.event()
        assert name == "status"
        assert snap["status"]["engines"]["main"]["state"] == "stopped"
        assert snap["controls"] is False and snap["auth"] is False
        # an open stream is not a client that keeps the shim up
        assert gw.connections.open == 0
        engine.state = State.STARTING
        gw.engine_changed()
        name, snap = await stream.event()
        assert snap["status"]["engines"]["main"]["state"] == "starting"
        engine.state = State.READY
        gw.engine_event("main", ColdStart(2.5))
        engine.state_since = 1_800_000_010.0
        gw.engine_changed()
        _, snap = await stream.event()
        main = snap["status"]["engines"]["main"]
        assert main["state"] == "ready"
        assert snap["engines"]["main"]["cold_starts"][-1][1] == 2.5
        assert snap["engines"]["main"]["memory_current_bytes"] == 123 * 2**20
    # the metrics' hook still gets the event; nothing was asked of the engine
    assert b'vllm_gateway_cold_start_seconds_count{engine="main"} 1' in gw.metrics.render()
    assert engine.calls == []
    assert gw.page.streams == 0
    assert gw.connections.open == 0


async def test_idle_pages_cost_nothing_but_keepalives(autojump_clock: trio.testing.MockClock) -> None:
    builds = 0
    async with gateway() as (gw, engine), trio.open_nursery() as nursery:
        original = gw.page.build

        async def counting() -> dict[str, object]:
            nonlocal builds
            builds += 1
            return await original()

        gw.page.build = counting  # type: ignore[method-assign]
        streams = []
        for _ in range(10):
            client_stream, server_stream = trio.testing.memory_stream_pair()
            nursery.start_soon(gw.handle, server_stream)
            stream = Stream(Client(client_stream))
            await stream.open()
            assert (await stream.event())[0] == "status"
            streams.append((client_stream, stream))
        assert builds == 1  # one snapshot for all the pages
        # ten idle minutes: keep-alive comments only, about one a minute
        start = trio.current_time()
        for _, stream in streams:
            for _ in range(10):
                name, text = await stream.event()
                assert name == ":" and text == ": keep-alive"
        assert trio.current_time() - start == pytest.approx(10 * KEEPALIVE_S, abs=1.0)
        assert builds == 1
        # one change: one more snapshot, whatever the number of pages
        engine.state = State.READY
        gw.engine_changed()
        for _, stream in streams:
            name, snap = await stream.event()
            assert snap["status"]["engines"]["main"]["state"] == "ready"
        assert builds == 2
        for client_stream, _ in streams:
            await client_stream.send_stream.aclose()
    assert engine.calls == []
    assert gw.page.streams == 0


async def test_a_shim_that_exits_ends_the_stream_with_a_goodbye() -> None:
    async with gateway() as (gw, _), trio.open_nursery() as nursery:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        serving = trio.CancelScope()

        async def serve() -> None:
            with serving:
                await gw.handle(server_stream)

        nursery.start_soon(serve)
        stream = Stream(Client(client_stream))
        await stream.open()
        assert (await stream.event())[0] == "status"
        serving.cancel()  # as the idle exit does
        name, goodbye = await stream.event()
        assert name == "exit" and goodbye["at"] > 0
        assert isinstance(await stream._next(), h11.EndOfMessage)
    assert gw.page.streams == 0


async def test_a_burst_of_changes_makes_few_snapshots(autojump_clock: trio.testing.MockClock) -> None:
    async with gateway() as (gw, _), trio.open_nursery() as nursery, connection(gw, nursery) as c:
        stream = Stream(c)
        await stream.open()
        await stream.event()
        for _ in range(100):
            gw.page.request_done("POST", "/v1/chat/completions", "/v1/chat/completions", "tiny", 200,
                                 0.01, 0.5)
            await trio.sleep(0.001)
        snapshots = []
        while (event := await stream.event())[0] == "status":
            snapshots.append(event[1])
        # at most one snapshot each MIN_INTERVAL_S: the 0.1 s burst makes one
        assert len(snapshots) == 1
        assert len(snapshots[0]["requests"]) == RING_SIZE
        assert snapshots[0]["requests"][0]["cold_start_ms"] == 500


async def test_the_stream_refreshes_while_an_engine_starts(autojump_clock: trio.testing.MockClock) -> None:
    async with gateway(State.READY) as (gw, engine), trio.open_nursery() as nursery, \
            connection(gw, nursery) as c:
        stream = Stream(c)
        await stream.open()
        await stream.event()
        engine.state = State.WAKING
        gw.engine_changed()
        t0 = trio.current_time()
        await stream.event()
        await stream.event()  # no change: the phase and memory move meanwhile
        assert trio.current_time() - t0 == pytest.approx(page_module.PHASE_REFRESH_S, abs=0.5)
        engine.state = State.READY
        gw.engine_changed()
        await stream.event()
        name, _ = await stream.event()
        assert name == ":"  # ready again: nothing until the keep-alive
        assert trio.current_time() - t0 >= KEEPALIVE_S


async def test_with_api_keys_the_stream_needs_a_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with gateway(api_keys=(API_KEY,), admin_key=ADMIN_KEY) as (gw, engine), \
            trio.open_nursery() as nursery:
        async with connection(gw, nursery) as c:
            assert (await c.request("GET", "/gateway/")).status == 200  # the files carry no data
        async with connection(gw, nursery) as c:
            assert (await c.request("GET", "/gateway/status")).status == 401
        for headers in ([], [("authorization", "Bearer sk-wrong")], [("authorization", API_KEY)]):
            async with connection(gw, nursery) as c:
                stream = Stream(c)
                await stream.open(headers)
                assert stream.status == 401
                assert json.loads(await stream.body())["error"]["code"] == "invalid_api_key"
        for key in (API_KEY, ADMIN_KEY):
            async with connection(gw, nursery) as c:
                stream = Stream(c)
                await stream.open([("authorization", f"Bearer {key}")])
                assert stream.status == 200
                _, snap = await stream.event()
                assert snap["auth"] is True and snap["controls"] is True
    assert API_KEY not in caplog.text and ADMIN_KEY not in caplog.text and "sk-wrong" not in caplog.text
    assert engine.calls == []


async def test_a_reload_that_changes_the_keys_applies_to_the_stream() -> None:
    """Rotated keys: the page's stream takes the new key and refuses the old
    one at once, as the API does; the page learns whether controls exist."""
    async with gateway(api_keys=("sk-old",)) as (gw, _), trio.open_nursery() as nursery:
        gw.apply_config(make_cfg(api_keys=(API_KEY,), admin_key=ADMIN_KEY))
        for key, status in (("sk-old", 401), (API_KEY, 200), (ADMIN_KEY, 200)):
            async with connection(gw, nursery) as c:
                stream = Stream(c)
                await stream.open([("authorization", f"Bearer {key}")])
                assert stream.status == status, key
                if status == 200:
                    _, snap = await stream.event()
                    assert snap["auth"] is True and snap["controls"] is True
        async with connection(gw, nursery) as c:  # and the API agrees
            old = [("authorization", "Bearer sk-old")]
            assert (await c.request("GET", "/v1/models", headers=old)).status == 401


def test_check_reader() -> None:
    check_reader([], [], None)
    check_reader([(b"authorization", b"Bearer k")], ["k"], None)
    check_reader([(b"authorization", b"Bearer a")], ["k"], "a")
    with pytest.raises(Exception, match="needs an API key"):
        check_reader([(b"authorization", b"Bearer a")], ["k"], None)


async def test_too_many_streams_are_refused(autojump_clock: trio.testing.MockClock) -> None:
    async with gateway() as (gw, _), trio.open_nursery() as nursery:
        streams = []
        for _ in range(MAX_STREAMS):
            client_stream, server_stream = trio.testing.memory_stream_pair()
            nursery.start_soon(gw.handle, server_stream)
            stream = Stream(Client(client_stream))
            await stream.open()
            streams.append(client_stream)
        async with connection(gw, nursery) as c:
            stream = Stream(c)
            await stream.open()
            assert stream.status == 503
        for client_stream in streams:
            await client_stream.send_stream.aclose()


async def test_a_snapshot_with_several_engines() -> None:
    cfgs = {name: EngineConfig(name=name, command=("vllm", "serve", name), models=(name,), port=port,
                               unit=f"vllm-{name}.service", memory=2 * 2**30)
            for name, port in (("chat", 8100), ("coder", 8101))}
    config = GatewayConfig(engines=cfgs, source="config.toml", gpu_memory=8 * 2**30)
    engines = {name: PageEngine(c) for name, c in cfgs.items()}
    engines["chat"].state = State.READY
    gw = Gateway(config, Fleet(config, engines, None), Notifier())  # type: ignore[arg-type]
    snap = await gw.page.build()
    assert snap["gpu_total_bytes"] == 8 * 2**30 and snap["gpu"] is None
    assert snap["engines"]["chat"]["gpu_bytes"] == 2 * 2**30  # awake: its configured size
    assert snap["engines"]["coder"]["gpu_bytes"] is None
    assert snap["engines"]["coder"]["memory_current_bytes"] is None  # stopped: not asked
    assert engines["coder"].systemd.asked == [] and engines["chat"].systemd.asked == ["vllm-chat.service"]
    assert snap["status"]["state"] == "ready"  # type: ignore[index]
    assert all(e.calls == [] for e in engines.values())


# ---- the request ring ----


async def test_requests_land_in_the_ring_newest_first() -> None:
    async with gateway() as (gw, _), trio.open_nursery() as nursery, connection(gw, nursery) as c:
        await c.request("GET", "/gateway/status")  # probes are left out
        await c.request("GET", "/nowhere")
        await c.request("GET", "/v1/models")
        await c.request("POST", "/gateway/stop")  # refused: no admin key
    records = gw.page.requests.as_json()
    assert [(r["method"], r["route"], r["status"]) for r in records] == [
        ("GET", "/v1/models", 200), ("GET", "other", 404)]
    assert records[0]["cold_start_ms"] is None and records[0]["duration_ms"] >= 0


def test_the_ring_keeps_the_last_records() -> None:
    ring = RequestRing(size=3)
    for i in range(5):
        ring.add(RequestRecord(float(i), "POST", "/v1/completions", "m", 200, 1.0, 250.4 if i else None))
    assert [r["at"] for r in ring.as_json()] == [4.0, 3.0, 2.0]
    assert ring.as_json()[0]["cold_start_ms"] == 250
    assert ring.added == 5
    assert len(RequestRing().records()) == 0 and RING_SIZE == 50


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
@pytest.mark.parametrize("call", ["stop?cause=idle&stop_after", "sleep?cause=idle&sleep_after",
                                  "yield?by=game&timeout"])
async def test_an_admin_call_with_a_bad_number_of_seconds_is_a_400_naming_it(call: str, value: str) -> None:
    async with gateway(admin_key=ADMIN_KEY) as (gw, engine), trio.open_nursery() as nursery, \
            connection(gw, nursery) as c:
        reply = await c.request("POST", f"/gateway/{call}={value}",
                                headers=[("authorization", f"Bearer {ADMIN_KEY}")])
    assert reply.status == 400
    name = call.rpartition("&")[2]
    message = json.loads(reply.body)["error"]["message"]
    assert f"`{name}` must be a number of seconds" in message and repr(value) in message
    assert engine.calls == []
