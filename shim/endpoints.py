"""The gateway's own endpoints: /health, /gateway/status and the page's
files and events, /metrics, the admin calls (/gateway/start, stop, sleep,
wake, restart, yield, release, reload, config), and /v1/models from the
configuration. The status is assembled here (statusjson.py has its schema).
None of them is forwarded, and only the admin calls start or wake an engine;
one engine is a fleet of one (`dispatch.admin_targets` picks whom an admin
call acts on)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from urllib.parse import parse_qsl

import h11

from . import journal, lifecycle, reloading, statusjson
from .dispatch import admin_targets
from .edge import is_head
from .engine import Engine
from .errors import BadRequest, Conflict
from .fleet import Fleet
from .gpustatus import gpus_and_holders
from .lifecycle import State
from .metrics import CONTENT_TYPE, Metrics, merge_expositions
from .page import Page
from .proxy import ClientSide, Exchange
from .routes import Kind, Route
from .upstream import call
from .yielding import HOLDER, parse_gpus

# `vllm-gateway yield` waits this long for requests in flight before stopping engines.
YIELD_TIMEOUT_S = 120.0


class Endpoints:
    """Answers the gateway's own endpoints. `gateway` gives the configuration
    now and takes a reload's (reloading.py)."""

    def __init__(self, gateway: reloading.Reloadable, fleet: Fleet, metrics: Metrics, page: Page,
                 started: float) -> None:
        self.gateway = gateway
        self.fleet = fleet
        self.engines = fleet.engines
        self.metrics = metrics
        self.page = page
        self.started = started  # epoch seconds
        # the start phase last shown per engine, with the start it belongs to:
        # phases only move forward
        self._phases: dict[str, tuple[float, str]] = {}

    # ---- the status ----

    def status(self) -> statusjson.GatewayStatus:
        """The gateway's state (statusjson.py has the schema)."""
        gpu = self.fleet.gpu
        gpus, held = gpus_and_holders(self.fleet)
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
            idle_s=0.0 if e.idle_since is None else max(0.0, time.time() - e.idle_since),
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

    # ---- the endpoints ----

    async def answer(self, client: ClientSide, req: h11.Request, route: Route, kind: Kind) -> Exchange:
        """The gateway's own endpoints."""
        if kind is Kind.HEALTH:
            # one state for all; with several engines, each one's too
            state = lifecycle.summary(e.state for e in self.engines.values())
            health: dict[str, object] = {"status": "ok", "engine": state.value}
            if len(self.engines) > 1:
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

    def _targets(self, query: Mapping[str, str], *, all_by_default: bool) -> list[Engine]:
        """The engines an admin call acts on (dispatch.admin_targets)."""
        names = admin_targets(list(self.engines), query.get("engine"), all_by_default=all_by_default)
        return [self.engines[name] for name in names]

    async def _admin(self, client: ClientSide, route: Route) -> Exchange:
        kind = route.kind
        query = dict(parse_qsl(route.query))
        waited = 0.0
        if kind is Kind.ADMIN_START:
            for e in self._targets(query, all_by_default=False):
                waited += await e.acquire(self.gateway.cfg.max_waiting)
        elif kind is Kind.ADMIN_STOP:
            idle = query.get("cause") == "idle"  # the idle check: only if the engine is still idle
            stop_after_s = _seconds(query.get("stop_after"), "stop_after")
            targets = self._targets(query, all_by_default=True)
            for e in targets:
                e.request_stop("idle" if idle else "manual", only_if_idle=idle, stop_after_s=stop_after_s)
            for e in targets:
                await e.wait_changed(1.0)
                await e.wait_for(State.STOPPED, State.FAILED,
                                 timeout_s=e.cfg.stop_grace_s + e.cfg.stop_timeout_s + 10)
        elif kind is Kind.ADMIN_SLEEP:
            # the idle check: the engine decides again on its live state
            idle = query.get("cause") == "idle"
            sleep_after_s = _seconds(query.get("sleep_after"), "sleep_after")
            targets = self._targets(query, all_by_default=True)
            if len(targets) > 1:  # all of several, none named: those that can sleep now
                targets = [e for e in targets if e.sleep_enabled and e.state is State.READY]
            for e in targets:
                await self._admin_sleep(e, idle, sleep_after_s)
        elif kind is Kind.ADMIN_WAKE:
            for e in self._targets(query, all_by_default=False):
                if e.state is not State.SLEEPING:
                    raise Conflict(
                        f"vllm-gateway: the engine {e.cfg.name!r} is {e.state.value}, not sleeping")
                waited += await e.acquire(self.gateway.cfg.max_waiting)
        elif kind is Kind.ADMIN_YIELD:
            holder = query.get("by", "manual")
            if not HOLDER.fullmatch(holder):
                raise BadRequest("vllm-gateway: `by` must be 1-128 letters, digits or ._@:-")
            timeout = _seconds(query.get("timeout"), "timeout")
            try:
                gpus = None if query.get("gpu") is None else parse_gpus(query["gpu"])
            except ValueError as bad:
                raise BadRequest(f"vllm-gateway: `gpu` must be {bad}") from None
            if not await self.fleet.hold(holder, YIELD_TIMEOUT_S if timeout is None else timeout, gpus):
                raise Conflict("vllm-gateway: the engines did not free the GPU in time; see the journal")
        elif kind is Kind.ADMIN_RELEASE:
            self.fleet.release(None if query.get("all") == "1" else query.get("by", "manual"))
        elif kind is Kind.ADMIN_RELOAD:
            return await self._json(client, 200, reloading.reload(self.gateway))
        elif kind is Kind.ADMIN_CONFIG:
            return await self._json(client, 200, reloading.running_config(self.gateway.cfg))
        elif kind is Kind.ADMIN_RESTART:
            for e in self._targets(query, all_by_default=False):
                e.request_stop("manual")
                await e.wait_changed(1.0)
                await e.wait_for(State.STOPPED, State.FAILED, timeout_s=e.cfg.stop_timeout_s + 10)
                waited += await e.acquire(self.gateway.cfg.max_waiting)
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
        await client.send(h11.Data(data=b"" if is_head(client) else body))
        await client.send(h11.EndOfMessage())
        return Exchange(status=200, bytes_out=len(body))

    async def _admin_sleep(self, e: Engine, idle: bool, sleep_after_s: float | None) -> None:
        if not e.sleep_enabled:
            why = e.last_sleep_error or "sleep_after is off in the configuration"
            raise Conflict(f"vllm-gateway: the engine {e.cfg.name!r} cannot sleep: {why}")
        if e.state is State.SLEEPING:
            return
        if e.state is not State.READY:
            raise Conflict(f"vllm-gateway: the engine is {e.state.value}; only a ready engine can sleep")
        e.request_sleep("idle" if idle else "manual", only_if_idle=idle, sleep_after_s=sleep_after_s)
        await e.wait_changed(1.0)
        if e.in_state(State.GOING_TO_SLEEP):
            await e.wait_for(State.SLEEPING, State.READY, State.STOPPING, State.STOPPED,
                             timeout_s=e.cfg.stop_timeout_s + 300)
        if not e.in_state(State.SLEEPING):
            raise Conflict(f"vllm-gateway: the engine did not go to sleep (it is {e.state.value}; "
                           f"{e.active} requests in flight; {e.last_sleep_error or 'no error'})")

    async def models(self, client: ClientSide) -> Exchange:
        """GET /v1/models from the configuration: no engine is asked (or started)."""
        return await self._json(client, 200, {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": int(self.started), "owned_by": "vllm-gateway"}
                for m in self.gateway.cfg.all_models()
            ],
        })

    async def _json(self, client: ClientSide, status: int, value: object) -> Exchange:
        body = json.dumps(value).encode()
        await client.send(h11.Response(status_code=status, headers=[
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        ]))
        if is_head(client):
            body = b""  # HEAD: the headers of a GET, no body
        await client.send(h11.Data(data=body))
        await client.send(h11.EndOfMessage())
        return Exchange(status=status, bytes_out=len(body))


def _seconds(value: str | None, name: str) -> float | None:
    """A query's number of seconds (a threshold, a timeout), or None."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise BadRequest(f"vllm-gateway: `{name}` must be a number of seconds, not {value!r}")
    return seconds
