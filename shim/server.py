"""The gateway's HTTP side: accepts clients, reads and bounds their
requests, asks the dispatch step (dispatch.py, pure) what serves each one,
then answers its own endpoints or forwards through the proxy; it also
reports its state to systemd. The status it serves has its schema in
statusjson.py."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import assert_never
from urllib.parse import parse_qsl

import h11
import trio

from . import events, gpustatus, journal, lifecycle, reloading, statusjson
from .config import GatewayConfig
from .dispatch import ADMIN_KINDS, ConfiguredModels, Engines, Forward, Own, dispatch
from .engine import Engine
from .errors import (
    BadRequest,
    Conflict,
    GatewayError,
    HeadersTooLarge,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    StreamBroken,
    UpstreamError,
    URITooLong,
    error_body,
)
from .fleet import Fleet
from .http1 import ServerConnection
from .httpio import header, next_event
from .lifecycle import State
from .metrics import CONTENT_TYPE, EngineLive, Live, Metrics, accumulate, merge_expositions
from .notify import Notifier
from .page import Page
from .proxy import (
    ClientSide,
    Exchange,
    forward,
    outcome_of,
    send_stream_error,
)
from .reqlog import RequestLog
from .routes import Kind, Route, classify
from .security import check_admin, check_client
from .status import ShimStatus, format_statuses
from .upstream import call
from .yielding import HOLDER, parse_gpus

log = logging.getLogger("vllm_gateway.server")
# log.info for the line each request writes, without its per-call overhead
_request_log = RequestLog(log, __file__, "_log_request")

# Bounds on what a client may send. Headers of OpenAI clients are ~1 KiB;
# bodies carry prompts and base64 images, so tens of MiB.
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024
# Longer request targets are refused (414); OpenAI API paths are short.
MAX_TARGET_BYTES = 8 * 1024
# `vllm-gateway yield` waits this long for requests in flight before stopping engines.
YIELD_TIMEOUT_S = 120.0
_OVERLOADED_BODY = error_body("vllm-gateway: too many open connections; try again", "engine_unavailable",
                              "too_many_connections")
OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_OVERLOADED_BODY)).encode() + b"\r\n\r\n"
    + _OVERLOADED_BODY
)
# Once its request head is in, a client must send the body within this
# (slow clients would otherwise hold connections forever). The head itself
# must come within KEEPALIVE_IDLE_S of the connection or the last answer.
REQUEST_READ_TIMEOUT_S = 60.0
# After an error answer that closes the connection, read (and drop) what the
# client still sends for a moment: closing with unread input makes the kernel
# send a reset, which can destroy the answer before the client reads it.
LINGER_S = 2.0
LINGER_MAX_BYTES = 64 * 1024 * 1024
# An idle keep-alive connection is closed after this.
KEEPALIVE_IDLE_S = 75.0


class Activity:
    """Requests in flight and open connections, for the status and the idle
    exit. Idle time is each engine's own (engine.py)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.connections = 0
        self.last_connection = trio.current_time()
        self.changed: trio.Event = trio.Event()

    @contextmanager
    def request(self) -> Iterator[None]:
        self.in_flight += 1
        if self.in_flight == 1:
            self.bump()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.bump()

    def bump(self) -> None:
        """Wake whoever waits for a change (status, idle exit)."""
        changed, self.changed = self.changed, trio.Event()
        changed.set()

    @contextmanager
    def detached(self) -> Iterator[None]:
        """An open status page's stream: not a client that keeps the shim up."""
        self.connections -= 1
        if self.connections == 0:
            self.bump()
        try:
            yield
        finally:
            self.connections += 1


class Gateway:
    def __init__(self, cfg: GatewayConfig, fleet: Fleet, notifier: Notifier) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.engines = fleet.engines
        self.engine = fleet.first  # the only one, with one engine
        self._by_model = {m: name for name, e in self.engines.items() for m in e.cfg.models}
        self.notifier = notifier
        self.activity = Activity()
        self.started = time.time()
        # request ids: a random prefix per shim and a counter (cheap, unique)
        self._id_prefix = f"req-{secrets.token_hex(4)}-"
        self._id_count = 0
        # the start phase last shown per engine, with the start it belongs to:
        # phases only move forward
        self._phases: dict[str, tuple[float, str]] = {}
        self.metrics = Metrics(Live(lambda: [
            EngineLive(e.cfg.name, e.state, e.busy, e.waiting,
                       accumulate(e.state_seconds, e.state, e.state_since))
            for e in self.engines.values()
        ], functools.partial(gpustatus.gpus_live, fleet), functools.partial(gpustatus.held_live, fleet)))
        self.page = Page(cfg, fleet, self.status_now, self.activity.detached)

    def apply_config(self, cfg: GatewayConfig) -> None:
        """A reload's new configuration (reloading.reload is the caller)."""
        self.cfg = self.fleet.cfg = cfg

    # ---- status ----

    def _next_request_id(self) -> str:
        self._id_count += 1
        return f"{self._id_prefix}{self._id_count:x}"

    def shim_status(self, e: Engine) -> ShimStatus:
        return ShimStatus(state=e.state.value, in_flight=e.busy, idle_since=e.idle_since, unit=e.cfg.unit,
                          can_sleep=e.sleep_enabled or e.cfg.sleep_after_s is None)

    def publish_status(self) -> None:
        """Send the STATUS text (the status loop calls it on every change)."""
        self.notifier.status(format_statuses([self.shim_status(e) for e in self.engines.values()],
                                             time.time()))

    def engine_event(self, name: str, event: events.EngineEvent) -> None:
        """What the engine `name` reported (its owner calls this)."""
        self.metrics.engine_event(name, event)
        self.page.engine_event(name, event)

    def engine_changed(self) -> None:
        """The engine's state changed: wake the status loop and the idle exit."""
        self.activity.bump()
        self.page.bump()

    def status(self) -> statusjson.GatewayStatus:
        """The gateway's state (statusjson.py has the schema)."""
        gpu = self.fleet.gpu
        gpus, held = gpustatus.gpus_and_holders(self.fleet)
        fleet = statusjson.FleetStatus(
            holds={who: round(since, 3) for who, since in self.fleet.holds.items()},
            swaps=self.fleet.swaps,
            gpu=None if gpu is None else {"total_bytes": gpu.total, "free_bytes": gpu.free,
                                          "source": gpu.source},
            gpus=gpus, held_gpus=held,
        )
        return statusjson.GatewayStatus(
            {name: statusjson.EngineEntry(self.engine_status(e), self.engine_on_gpu(e))
             for name, e in self.engines.items()},
            fleet, statusjson.GatewayProcess(os.getpid(), time.time() - self.started),
        )

    def engine_status(self, e: Engine) -> statusjson.EngineStatus:
        error = e.last_error
        return statusjson.EngineStatus(
            state=e.state.value,
            state_since=e.state_since,
            idle_s=self.shim_status(e).idle_s(time.time()),
            in_flight=e.busy,
            waiting=e.waiting,
            engine=e.cfg.name,
            unit=e.cfg.unit,
            main_pid=e.main_pid or None,
            port=e.cfg.port,
            models=tuple(e.cfg.models),
            stop_after_s=e.cfg.stop_after_s,
            sleep_after_s=e.cfg.sleep_after_s,
            sleep_level=e.cfg.sleep_level,
            sleep_enabled=e.sleep_enabled,
            last_sleep_error=e.last_sleep_error,
            last_wake_s=e.last_wake_s,
            last_cold_start_s=e.last_cold_start_s,
            last_error=None if error is None else error.message,
            last_error_at=None if error is None else error.at,
            last_error_past=None if error is None else error.past,
            sleep_refused=e.last_sleep_error if e.sleep_refused else None,
        )

    def engine_on_gpu(self, e: Engine) -> statusjson.EngineOnGpu:
        check = self.fleet.memory_checks.get(e.cfg.name)
        return statusjson.EngineOnGpu(
            expected_start_s=e.facts.start_s,
            memory_bytes=self.fleet.need(e),
            pinned=e.cfg.pinned,
            draining=e.draining,
            last_memory_check=None if check is None else check.as_json(),
            gpus=tuple(e.cfg.devices),
            measured_memory=self.fleet.measured.as_json(e.cfg),
        )

    async def status_now(self) -> statusjson.GatewayStatus:
        """`status`, with the start phase of starting engines from their journal."""
        status = self.status()
        entries = dict(status.engines)
        for name, e in self.engines.items():
            if e.in_state(State.STARTING):
                since = e.state_since
                lines = await journal.tail(e.cfg.unit, since, lines=journal.PHASE_LINES)
                shown = self._phases.get(name)
                phase = journal.start_phase(lines, shown[1] if shown and shown[0] == since else "")
                self._phases[name] = (since, phase)
                entries[name] = replace(entries[name], start_phase=phase)
        return replace(status, engines=entries)

    async def status_loop(self) -> None:
        """Keep systemd's STATUS current: sent on every change (engine state,
        in flight 0 <-> 1) and with each watchdog ping. The status carries
        the absolute idle_since, so it never needs a timer to stay true;
        when nothing happens the shim wakes only for the watchdog."""
        watchdog = Notifier.watchdog_interval_s()
        while True:
            self.publish_status()
            self.notifier.watchdog()
            with trio.move_on_after(watchdog if watchdog else math.inf):
                await self.activity.changed.wait()

    async def exit_when_idle(self, cancel: trio.CancelScope) -> None:
        """With the engine stopped and no connection for exit_after, stop
        serving: the socket unit keeps the port and starts us again. Waits on
        changes and one deadline, not a polling timer."""
        limit = self.cfg.exit_after_s
        if limit is None:
            return
        while True:
            changed = self.activity.changed
            if (
                all(e.state is State.STOPPED and e.waiting == 0 for e in self.engines.values())
                and self.activity.connections == 0
            ):
                with trio.move_on_at(self.activity.last_connection + limit) as deadline:
                    await changed.wait()
                if deadline.cancelled_caught:
                    log.info("engine stopped and no client for %g s: exiting until the next connection",
                             limit)
                    cancel.cancel()
                    return
            else:
                await changed.wait()

    # ---- connections ----

    async def handle(self, stream: trio.SocketStream) -> None:
        self.activity.connections += 1
        self.activity.last_connection = trio.current_time()
        if self.activity.connections == 1:
            self.activity.bump()
        conn = ServerConnection(max_incomplete_event_size=MAX_HEADER_BYTES)
        client = ClientSide(stream, conn)
        # the control socket is the only Unix socket we listen on
        client.control = getattr(getattr(stream, "socket", None), "family", None) == socket.AF_UNIX
        try:
            if self.activity.connections > self.cfg.max_connections and not client.control:
                log.warning("refusing a connection: %d open (max_connections)", self.activity.connections)
                client.linger = True
                await stream.send_all(OVERLOADED)
                return
            while True:
                if not await self._one_request(client):
                    break
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, StreamBroken):
            pass
        except Exception:
            # one broken exchange must never take the listener (and every
            # other client) down with it
            log.exception("unexpected error on a client connection; closing it")
        finally:
            self.activity.connections -= 1
            self.activity.last_connection = trio.current_time()
            if self.activity.connections == 0:
                self.activity.bump()
            with trio.CancelScope(shield=True):
                if client.linger:
                    await _linger(stream)
                await stream.aclose()

    async def _one_request(self, client: ClientSide) -> bool:
        """Serve one request on the connection; False when it should close."""
        conn = client.conn
        try:
            # a new cycle: the client may stay idle this long before its next request
            # (after an answer, it has rarely sent the next one yet: wait before reading)
            event = await next_event(conn, client.stream, trio.current_time() + KEEPALIVE_IDLE_S,
                                     wait_first=client.answered)
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return False
            assert isinstance(event, h11.Request)
            client.method = event.method
            route = classify(event.method.decode("ascii", "replace"), event.target.decode("latin-1"))
            # before the body is read: an unauthenticated or misdirected
            # request costs nothing, and never starts or wakes the engine
            self._check_access(client, event, route)
            if conn.client_is_waiting_for_100_continue:  # ready for the body: ask for it
                await client.send(h11.InformationalResponse(status_code=100, headers=[]))
            body = await self._read_body(client, trio.current_time() + REQUEST_READ_TIMEOUT_S)
        except trio.TooSlowError:
            if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                return False  # an idle keep-alive connection, closed quietly
            await self._send_error(client, RequestTimeout("vllm-gateway: the request was not sent in time"))
            return False
        except h11.RemoteProtocolError as e:
            err: GatewayError = HeadersTooLarge(f"vllm-gateway: {e}") if e.error_status_hint == 431 \
                else _bad_request(e)
            err.status = e.error_status_hint if e.error_status_hint >= 400 else 400
            await self._send_error(client, err, close=True)
            return False
        except GatewayError as e:  # access refused, target or body too large
            log.info("refused %s: %d %s", _peer(client), e.status, e.message)
            await self._send_error(client, e, close=True)
            return False
        await self._serve(client, event, route, body)
        client.answered = True
        return True

    def _check_access(self, client: ClientSide, req: h11.Request, route: Route) -> None:
        if len(req.target) > MAX_TARGET_BYTES:
            raise URITooLong(f"vllm-gateway: the request target is longer than {MAX_TARGET_BYTES} bytes")
        if route.kind in (Kind.HEALTH, Kind.PAGE, Kind.EVENTS):
            return  # liveness probes need no key; the page's data stream checks its own
        if route.kind in ADMIN_KINDS:
            check_admin(req.headers, self.cfg.admin_key, client.control)
        elif not client.control:
            check_client(req.headers, self.cfg.api_keys)

    async def _read_body(self, client: ClientSide, deadline: float) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await next_event(client.conn, client.stream, deadline)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY_BYTES:
                    raise PayloadTooLarge(
                        f"vllm-gateway: the request body is larger than {MAX_BODY_BYTES // 2**20} MiB"
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise h11.RemoteProtocolError("unexpected event in the request body")

    async def _serve(self, client: ClientSide, req: h11.Request, route: Route, body: bytes) -> None:
        t0 = trio.current_time()
        request_id = (header(req.headers, b"x-request-id") or b"").decode("latin-1")[:64] \
            or self._next_request_id()
        method = req.method.decode("ascii", "replace")
        ex = Exchange()
        if route.kind is Kind.ENGINE:
            self.page.bump()  # one more in flight
        try:
            with self.activity.request() if route.kind is Kind.ENGINE else nullcontext():
                try:
                    ex = await self._dispatch(client, req, route, body, request_id, ex)
                except GatewayError as e:
                    ex.outcome = outcome_of(e)
                    if client.conn.our_state is h11.SEND_RESPONSE:
                        ex.status = e.status
                        ex.bytes_out = await self._send_error(client, e, request_id)
                    else:
                        if ex.event_stream and client.conn.our_state is h11.SEND_BODY:
                            ex.bytes_out += await send_stream_error(client, e.body())
                        raise StreamBroken(e.message) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if ex.outcome == "complete":
                ex.outcome = "client_gone"
            raise
        except trio.Cancelled:
            if ex.outcome == "complete":
                ex.outcome = "cancelled"
            raise
        except BaseException:
            if ex.outcome == "complete":
                ex.outcome = "error"
            raise
        finally:
            self._log_request(method, route, request_id, ex, trio.current_time() - t0)

    def _log_request(self, method: str, route: Route, request_id: str, ex: Exchange, seconds: float) -> None:
        """The request's journal line and metrics, however it ended."""
        ms = seconds * 1000
        label = route.label
        self.metrics.request(label, ex.status, seconds, ex.tool_calls, ex.outcome)
        self.page.request_done(method, route.path, label, ex.model, ex.status, seconds, ex.waited_s)
        if not log.isEnabledFor(logging.INFO):
            return
        cold = f" cold_start_ms={ex.waited_s * 1000:.0f}" if ex.waited_s > 0 else ""
        tools = f" tool_calls={ex.tool_calls}" if ex.tool_calls else ""
        ended = f" outcome={ex.outcome}" if ex.outcome != "complete" else ""
        # journal fields: `journalctl --user -u vllm-gateway REQUEST_ID=...` finds one request
        fields = {
            "REQUEST_ID": request_id, "MODEL": ex.model or "", "STATUS": ex.status,
            "DURATION_MS": round(ms), "ROUTE": label, "OUTCOME": ex.outcome,
        }
        if ex.waited_s > 0:
            fields["COLD_START_MS"] = round(ex.waited_s * 1000)
        _request_log.info(sys._getframe().f_lineno, "%s %s %d %dB %.1fms id=%s%s%s%s",
                          (method, route.path, ex.status, ex.bytes_out, ms, request_id, cold, tools, ended),
                          fields)

    async def _dispatch(
        self, client: ClientSide, req: h11.Request, route: Route, body: bytes, request_id: str,
        ex: Exchange,
    ) -> Exchange:
        step = dispatch(route, req.method.decode("ascii", "replace"), body, self._routing(),
                        first_ready=self.engine.ready)
        match step:
            case Own(kind):
                return await self._own(client, req, route, kind)
            case ConfiguredModels():
                return await self._json(client, 200, self._models_from_config())
            case Forward(name, adapted, parsed, model):
                ex.model = model
                return await forward(self.engines[name], client, req, route, adapted, request_id,
                                     self.cfg.max_waiting, parsed, self.cfg.stream_keepalive_s, ex)
            case _:
                assert_never(step)

    def _routing(self) -> Engines:
        """What the dispatch step knows of the engines: their configuration now."""
        return Engines({name: e.cfg for name, e in self.engines.items()}, self._by_model,
                       self.cfg.all_models())

    async def _own(self, client: ClientSide, req: h11.Request, route: Route, kind: Kind) -> Exchange:
        """The gateway's own endpoints."""
        if kind is Kind.HEALTH:
            health: dict[str, object] = {"status": "ok", "engine": self.engine.state.value}
            if self.cfg.several:
                health["engine"] = _summary(self.engines.values())
                health["engines"] = {name: e.state.value for name, e in self.engines.items()}
            return await self._json(client, 200, health)
        if kind is Kind.STATUS:
            return await self._json(client, 200, (await self.status_now()).as_json())
        if kind is Kind.PAGE:
            return await self.page.serve_file(client, route.path, req.headers)
        if kind is Kind.EVENTS:
            return await self.page.serve_events(client, req.headers)
        if kind is Kind.METRICS:
            return await self._metrics(client)
        return await self._admin(client, route)

    def _targets(self, route: Route, *, all_by_default: bool) -> list[Engine]:
        """The engines an admin call names (`?engine=NAME`); with several
        engines and none named, all of them or an error."""
        query = dict(parse_qsl(route.query))
        name = query.get("engine")
        if name is not None:
            if name not in self.engines:
                raise NotFound(f"vllm-gateway: no engine named {name!r}; engines: {', '.join(self.engines)}")
            return [self.engines[name]]
        if not self.cfg.several or all_by_default:
            return list(self.engines.values())
        raise BadRequest("vllm-gateway: name the engine with ?engine=NAME; engines: "
                         f"{', '.join(self.engines)}")

    async def _admin(self, client: ClientSide, route: Route) -> Exchange:
        kind = route.kind
        query = dict(parse_qsl(route.query))
        waited = 0.0
        if kind is Kind.ADMIN_START:
            for e in self._targets(route, all_by_default=False):
                e.request_start()
                waited += await e.acquire(self.cfg.max_waiting)
        elif kind is Kind.ADMIN_STOP:
            idle = query.get("cause") == "idle"  # the idle check: only if the engine is still idle
            stop_after_s = _seconds(query.get("stop_after"), "stop_after")
            targets = self._targets(route, all_by_default=True)
            for e in targets:
                e.request_stop("idle" if idle else "manual", only_if_idle=idle, stop_after_s=stop_after_s)
            for e in targets:
                await e.wait_changed(1.0)
                await e.wait_for(State.STOPPED, State.FAILED,
                                 timeout_s=e.cfg.stop_grace_s + e.cfg.stop_timeout_s + 10)
        elif kind is Kind.ADMIN_SLEEP:
            targets = self._targets(route, all_by_default=True)
            if self.cfg.several and "engine" not in query:
                targets = [e for e in targets if e.sleep_enabled and e.state is State.READY]
            for e in targets:
                await self._admin_sleep(e)
        elif kind is Kind.ADMIN_WAKE:
            for e in self._targets(route, all_by_default=False):
                if e.state is not State.SLEEPING:
                    raise Conflict(
                        f"vllm-gateway: the engine {e.cfg.name!r} is {e.state.value}, not sleeping")
                waited += await e.acquire(self.cfg.max_waiting)
        elif kind is Kind.ADMIN_YIELD:
            holder = query.get("by", "manual")
            if not HOLDER.fullmatch(holder):
                raise BadRequest("vllm-gateway: `by` must be 1-128 letters, digits or ._@:-")
            timeout = _float(query.get("timeout"), YIELD_TIMEOUT_S)
            try:
                gpus = None if query.get("gpu") is None else parse_gpus(query["gpu"])
            except ValueError as bad:
                raise BadRequest(f"vllm-gateway: `gpu` must be {bad}") from None
            if not await self.fleet.hold(holder, timeout, gpus):
                raise Conflict("vllm-gateway: the engines did not free the GPU in time; see the journal")
        elif kind is Kind.ADMIN_RELEASE:
            self.fleet.release(None if query.get("all") == "1" else query.get("by", "manual"))
        elif kind is Kind.ADMIN_RELOAD:
            return await self._json(client, 200, reloading.reload(self))
        elif kind is Kind.ADMIN_CONFIG:
            return await self._json(client, 200, reloading.running_config(self.cfg))
        elif kind is Kind.ADMIN_RESTART:
            for e in self._targets(route, all_by_default=False):
                e.request_stop("manual")
                await e.wait_changed(1.0)
                await e.wait_for(State.STOPPED, State.FAILED, timeout_s=e.cfg.stop_timeout_s + 10)
                e.request_start()
                waited += await e.acquire(self.cfg.max_waiting)
        ex = await self._json(client, 200, self.status().as_json())
        ex.waited_s = waited
        return ex

    async def _metrics(self, client: ClientSide) -> Exchange:
        """Ours, then the engines' own `vllm:` metrics while they are up: a
        scrape never starts or wakes one."""
        body = self.metrics.render()
        theirs = []
        for e in self.engines.values():
            if e.ready:
                answer = await call("127.0.0.1", e.cfg.port, "GET", "/metrics")
                if answer is not None and answer[0] == 200:
                    theirs.append(answer[1])
        body += theirs[0] if len(theirs) == 1 else merge_expositions(theirs)
        await client.send(h11.Response(status_code=200, headers=[
            (b"content-type", CONTENT_TYPE), (b"content-length", str(len(body)).encode()),
        ]))
        await client.send(h11.Data(data=b"" if _is_head(client) else body))
        await client.send(h11.EndOfMessage())
        return Exchange(status=200, bytes_out=len(body))

    async def _admin_sleep(self, e: Engine) -> None:
        if not e.sleep_enabled:
            why = e.last_sleep_error or "sleep_after is off in the configuration"
            raise Conflict(f"vllm-gateway: the engine {e.cfg.name!r} cannot sleep: {why}")
        if e.state is State.SLEEPING:
            return
        if e.state is not State.READY:
            raise Conflict(f"vllm-gateway: the engine is {e.state.value}; only a ready engine can sleep")
        e.request_sleep("manual")
        await e.wait_changed(1.0)
        if e.in_state(State.GOING_TO_SLEEP):
            await e.wait_for(State.SLEEPING, State.READY, State.STOPPING, State.STOPPED,
                             timeout_s=e.cfg.stop_timeout_s + 300)
        if not e.in_state(State.SLEEPING):
            raise Conflict(f"vllm-gateway: the engine did not go to sleep (it is {e.state.value}; "
                           f"{e.active} requests in flight; {e.last_sleep_error or 'no error'})")

    def _models_from_config(self) -> dict[str, object]:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": int(self.started), "owned_by": "vllm-gateway"}
                for m in self.cfg.all_models()
            ],
        }

    async def _json(self, client: ClientSide, status: int, value: object) -> Exchange:
        body = json.dumps(value).encode()
        await client.send(h11.Response(status_code=status, headers=[
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        ]))
        if _is_head(client):
            body = b""  # HEAD: the headers of a GET, no body
        await client.send(h11.Data(data=body))
        await client.send(h11.EndOfMessage())
        return Exchange(status=status, bytes_out=len(body))

    async def _send_error(
        self, client: ClientSide, e: GatewayError, request_id: str = "-", close: bool = False
    ) -> int:
        """Answer with the error; the body's size."""
        # IDLE too: after a malformed request head h11 still lets us answer it
        if client.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return 0
        body = e.body()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += e.headers()
        if close or isinstance(e, UpstreamError | RequestTimeout) or e.status in (400, 408, 413, 414, 431):
            headers.append((b"connection", b"close"))
            client.linger = True
        try:
            await client.send(h11.Response(status_code=e.status, headers=headers))
            await client.send(h11.Data(data=b"" if _is_head(client) else body))
            await client.send(h11.EndOfMessage())
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass
        if e.status >= 500:
            log.warning("request %s: %d %s", request_id, e.status, e.message)
        return 0 if _is_head(client) else len(body)


async def _linger(stream: trio.SocketStream) -> None:
    with trio.move_on_after(LINGER_S):
        try:
            await stream.send_eof()
            drained = 0
            while drained < LINGER_MAX_BYTES:
                data = await stream.receive_some(65536)
                if not data:
                    break
                drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, AttributeError):
            pass


def _peer(client: ClientSide) -> str:
    if client.control:
        return "the control socket"
    try:
        host, port = client.stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (AttributeError, OSError, ValueError):
        return "a client"


def _is_head(client: ClientSide) -> bool:
    return client.method == b"HEAD"


def _summary(engines: Iterable[Engine]) -> str:
    """One word for several engines: the most awake state among them."""
    return lifecycle.summary(e.state for e in engines).value


def _float(value: str | None, default: float) -> float:
    try:
        return default if value is None else max(0.0, float(value))
    except ValueError:
        raise BadRequest(f"vllm-gateway: not a number: {value!r}") from None


def _bad_request(e: h11.RemoteProtocolError) -> GatewayError:
    return BadRequest(f"vllm-gateway: malformed HTTP request: {e}")


def _seconds(value: str | None, name: str) -> float | None:
    """A query's number of seconds (the idle check's threshold), or None."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise BadRequest(f"vllm-gateway: `{name}` must be a number of seconds, not {value!r}")
    return seconds
