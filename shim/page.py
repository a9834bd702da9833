"""The status page: its static files, and the event stream that keeps it live.

`GET /gateway/` serves a small page from the package (shim/static), under a
strict Content-Security-Policy: no inline script or style, nothing from
elsewhere. The page reads `GET /gateway/events`, a server-sent-events stream
of one JSON snapshot per change (the engine's state, load, memory, recent
requests). Nothing here starts or wakes an engine, and nothing ticks:

- a stream waits on one change event; when nothing changes it wakes once a
  keep-alive interval to send a comment line, and not at all otherwise;
- a snapshot is built once per change and shared by every open stream;
- while an engine starts or wakes, its phase and memory move without a state
  change, so streams look again every PHASE_REFRESH_S then, and only then.

Keys stay out of URLs: the page sends them in an Authorization header with
fetch(), and reads the stream through fetch's body reader (EventSource
cannot send headers). The page's files carry no data and load without a key;
everything they show comes over the stream, which needs an API key when
`api_keys` is set (the admin key is accepted too).

An open stream is neither a request in flight nor a client that keeps the
shim up: the shim still exits after `exit_after` with pages open (a
forgotten tab must not keep it running for ever). The page then says that
the gateway is idle and reconnects when it is looked at again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import h11
import trio

from .config import GatewayConfig
from .engine import Engine
from .errors import QueueFull, Unauthorized
from .events import ColdStart, EngineEvent, Wake
from .fleet import Fleet
from .gpu import SliceProbe
from .lifecycle import AWAKE, State
from .proxy import ClientSide, Exchange
from .requestring import RequestRecord, RequestRing
from .security import bearer, key_matches
from .statusjson import GatewayStatus
from .systemd import SystemdError

log = logging.getLogger("vllm_gateway.page")

PAGE_PATH = "/gateway"  # canonical: "/gateway/" loses its trailing slash
EVENTS_PATH = "/gateway/events"
# path -> (file in shim/static, content type)
FILES: dict[str, tuple[str, bytes]] = {
    PAGE_PATH: ("index.html", b"text/html; charset=utf-8"),
    "/gateway/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    "/gateway/app.css": ("app.css", b"text/css; charset=utf-8"),
    "/gateway/favicon.svg": ("favicon.svg", b"image/svg+xml"),
}
CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       b"img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
# A comment line on an otherwise silent stream this often: under the 60 s
# after which nginx (proxy_read_timeout) drops a silent upstream, and rare
# enough that a hundred idle pages cost a hundred wake-ups a minute.
KEEPALIVE_S = 55.0
KEEPALIVE = b": keep-alive\n\n"
# While an engine starts or wakes (its phase and memory change without a
# state change), snapshots are rebuilt this often.
PHASE_REFRESH_S = 2.0
# At most one snapshot per stream this often: a burst of requests makes one
# update, not hundreds.
MIN_INTERVAL_S = 0.25
# The last words to a page when the shim exits may take this long.
GOODBYE_S = 1.0
# Open streams allowed at once; each holds a socket and a task. Beyond: 503.
MAX_STREAMS = 64
# Recent cold starts and wakes kept per engine, for the page's small chart.
HISTORY_SIZE = 20
# Routes that the ring leaves out: the page's own, and probes that repeat
# every few seconds and would push the requests that matter out.
UNRECORDED = frozenset({PAGE_PATH, EVENTS_PATH, *FILES, "/gateway/status", "/health", "/metrics"})


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: bytes
    etag: bytes


# The package's folder, not importlib.resources: the gateway is installed as
# files (pip, a venv), and resources' readers import zipfile, ~0.35 MB that
# the serving process would hold for its lifetime to read three files once.
STATIC = Path(__file__).parent / "static"


def _load(name: str, content_type: bytes) -> StaticFile:
    body = (STATIC / name).read_bytes()
    return StaticFile(body, content_type, b'"' + hashlib.sha256(body).hexdigest()[:16].encode() + b'"')


def load_files() -> dict[str, StaticFile]:
    """The page's files, read from the package once."""
    return {path: _load(name, ctype) for path, (name, ctype) in FILES.items()}


def check_reader(
    headers: Iterable[tuple[bytes, bytes]], api_keys: Sequence[str], admin_key: str | None
) -> None:
    """With api_keys set, the stream needs one of them, or the admin key."""
    if not api_keys:
        return
    keys = [*api_keys, *([admin_key] if admin_key else [])]
    if not key_matches(bearer(headers), keys):
        raise Unauthorized("vllm-gateway: the status stream needs an API key (Authorization: Bearer KEY)")


def sse_event(name: str, payload: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


@dataclass(frozen=True)
class Timing:
    at: float  # epoch seconds
    seconds: float


class Page:
    """Owns the page's state: the request ring, the start/wake history and
    the shared snapshot. The request path and the engines' event hooks write
    through its methods; the streams only read."""

    def __init__(
        self,
        cfg: GatewayConfig,
        fleet: Fleet,
        status: Callable[[], Awaitable[GatewayStatus]],
        detached: Callable[[], AbstractContextManager[None]],
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.engines: Mapping[str, Engine] = fleet.engines
        self._status = status
        self._detached = detached  # while a stream is open: not a client of the idle exit
        self.files = load_files()
        self.requests = RequestRing()
        self.history: dict[str, dict[str, deque[Timing]]] = {
            name: {"cold_start": deque(maxlen=HISTORY_SIZE), "wake": deque(maxlen=HISTORY_SIZE)}
            for name in self.engines
        }
        self.streams = 0
        self._version = 0  # bumped on every change
        self._changed = trio.Event()
        self._built = -1  # the version of the snapshot below
        self._built_at = -math.inf
        self._snapshot = b""
        self._lock = trio.Lock()

    # ---- written by the gateway ----

    def bump(self) -> None:
        """Something the page shows changed. Costs an integer add while no page is open."""
        self._version += 1
        if self.streams:
            changed, self._changed = self._changed, trio.Event()
            changed.set()

    def engine_event(self, name: str, event: EngineEvent) -> None:
        match event:
            case ColdStart(seconds):
                self.history[name]["cold_start"].append(Timing(time.time(), seconds))
            case Wake(seconds):
                self.history[name]["wake"].append(Timing(time.time(), seconds))
        self.bump()

    def request_done(self, method: str, route: str, label: str, model: str | None, status: int,
                     seconds: float, waited_s: float) -> None:
        if route in UNRECORDED:
            return
        self.requests.add(RequestRecord(time.time(), method, label, model, status, seconds * 1000,
                                        waited_s * 1000 if waited_s > 0 else None))
        self.bump()

    # ---- the files ----

    async def serve_file(
        self, client: ClientSide, path: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> Exchange:
        f = self.files[path]
        if any(name == b"if-none-match" and f.etag in value for name, value in headers):
            await client.send(h11.Response(status_code=304, headers=[
                (b"etag", f.etag), *SECURITY_HEADERS, (b"connection", b"close")]))
            await client.send(h11.EndOfMessage())
            return Exchange(status=304)
        body = b"" if client.method == b"HEAD" else f.body
        await client.send(h11.Response(status_code=200, headers=[
            (b"content-type", f.content_type), (b"content-length", str(len(f.body)).encode()),
            (b"etag", f.etag), (b"cache-control", b"no-cache"), *SECURITY_HEADERS,
            # a browser keeps an idle connection open for minutes, which
            # would hold the shim up past exit_after: the page loads once
            (b"connection", b"close"),
        ]))
        await client.send(h11.Data(data=body))
        await client.send(h11.EndOfMessage())
        return Exchange(status=200, bytes_out=len(body))

    # ---- the event stream ----

    async def serve_events(self, client: ClientSide, headers: Iterable[tuple[bytes, bytes]]) -> Exchange:
        check_reader(headers, self.cfg.api_keys, self.cfg.admin_key)
        if self.streams >= MAX_STREAMS:
            raise QueueFull(f"vllm-gateway: {self.streams} status pages are open already", retry_after_s=10)
        await client.send(h11.Response(status_code=200, headers=[
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"), *SECURITY_HEADERS,
        ]))
        ex = Exchange(status=200, event_stream=True)
        if client.method == b"HEAD":
            await client.send(h11.EndOfMessage())
            return ex
        self.streams += 1
        try:
            with self._detached():
                hung_up = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_until_hangup, client, hung_up, nursery.cancel_scope)
                    try:
                        await self._stream(client, ex)
                    except trio.Cancelled:
                        if not hung_up.is_set():  # the shim exits
                            await _goodbye(client)
                        raise
        finally:
            self.streams -= 1
        return ex

    async def _stream(self, client: ClientSide, ex: Exchange) -> None:
        """Until the client goes: a snapshot after each change, else keep-alives."""
        sent_version = -1
        sent_at = -math.inf
        while True:
            if self._version != sent_version:
                await trio.sleep_until(sent_at + MIN_INTERVAL_S)
                sent_version = self._version
                data = await self.snapshot()
                await client.send(h11.Data(data=data))
                sent_at = trio.current_time()
                ex.bytes_out += len(data)
                continue
            changed = self._changed
            moving = self._moving()
            with trio.move_on_after(PHASE_REFRESH_S if moving else KEEPALIVE_S) as waited:
                await changed.wait()
            if waited.cancelled_caught:
                if moving:
                    if trio.current_time() - self._built_at >= PHASE_REFRESH_S:
                        self.bump()
                else:
                    await client.send(h11.Data(data=KEEPALIVE))
                    ex.bytes_out += len(KEEPALIVE)

    def _moving(self) -> bool:
        return any(e.state in (State.STARTING, State.WAKING) for e in self.engines.values())

    async def snapshot(self) -> bytes:
        """The latest snapshot as an SSE event, built at most once per change."""
        async with self._lock:
            if self._built != self._version:
                version = self._version
                self._snapshot = sse_event("status", await self.build())
                self._built, self._built_at = version, trio.current_time()
            return self._snapshot

    async def build(self) -> dict[str, object]:
        status = await self._status()
        probe = self.fleet.probe
        gpu = await probe.memory() if probe is not None else None
        engines = {}
        for name, e in self.engines.items():
            ram = await _memory_current(e) if e.state is not State.STOPPED else None
            # how much of the GPU the engine holds: the fake GPU's figure is
            # the RAM of its slice, so the unit's own RAM; on a real GPU the
            # configured (or estimated) size while it is awake
            if isinstance(probe, SliceProbe):
                gpu_bytes = ram
            else:
                gpu_bytes = e.cfg.memory_needed(self.fleet.total) if e.state in AWAKE else None
            failure = e.last_failure
            history = self.history[name]
            engines[name] = {
                "memory_current_bytes": ram,
                "gpu_bytes": gpu_bytes,
                "last_error_at": None if failure is None else round(failure.at, 3),
                "cold_starts": [[round(t.at, 3), round(t.seconds, 3)] for t in history["cold_start"]],
                "wakes": [[round(t.at, 3), round(t.seconds, 3)] for t in history["wake"]],
            }
        return {
            "now": round(time.time(), 3),
            "status": status.as_json(),
            "engines": engines,
            "gpu": None if gpu is None else {"total_bytes": gpu.total, "free_bytes": gpu.free,
                                             "source": gpu.source},
            "gpu_total_bytes": gpu.total if gpu is not None else self.fleet.total,
            "requests": self.requests.as_json(),
            "controls": self.cfg.admin_key is not None,
            "auth": bool(self.cfg.api_keys),
        }


async def _memory_current(e: Engine) -> int | None:
    try:
        return await e.systemd.memory_current(e.cfg.unit)
    except SystemdError:
        return None


async def _goodbye(client: ClientSide) -> None:
    """End the stream properly, so that the page can tell the shim's exit
    from a broken connection."""
    with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_S):
        try:
            await client.send(h11.Data(data=sse_event("exit", {"at": round(time.time(), 3)})))
            await client.send(h11.EndOfMessage())
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass


async def _until_hangup(client: ClientSide, hung_up: trio.Event, scope: trio.CancelScope) -> None:
    """End the stream when the browser goes away, not at the next keep-alive."""
    try:
        while await client.stream.receive_some(4096):
            pass  # a client sends nothing on an event stream; drop it
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    hung_up.set()
    scope.cancel()
