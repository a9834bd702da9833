"""The gateway, wired: the edge (edge.py) reads each request, the dispatch
step (dispatch.py, pure) picks what serves it, and the gateway's own
endpoints (endpoints.py) or the proxy (proxy.py) answer. Here too: the
status reported to systemd (STATUS=, the watchdog) on every change, and the
exit once every engine is stopped and no client has come for exit_after."""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import assert_never

import h11
import trio

from . import events, footprint, gpustatus
from .config import GatewayConfig
from .dispatch import ConfiguredModels, Engines, Forward, Own, dispatch
from .edge import Connections, Edge
from .endpoints import Endpoints
from .engine import Engine
from .fleet import Fleet
from .lifecycle import State
from .metrics import EngineLive, Live, Metrics, accumulate
from .notify import Notifier
from .page import Page
from .proxy import ClientSide, Exchange, forward
from .routes import Kind, Route
from .status import ShimStatus, format_statuses
from .statusjson import GatewayStatus

log = logging.getLogger("vllm_gateway.server")


class Gateway:
    """One per shim: its engines (a fleet of one or more), the edge that
    serves clients, and its own endpoints."""

    def __init__(self, cfg: GatewayConfig, fleet: Fleet, notifier: Notifier) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.engines = fleet.engines
        self._by_model = {m: name for name, e in self.engines.items() for m in e.cfg.models}
        self.notifier = notifier
        # set on every change that the status or the idle exit waits for
        self._changed = trio.Event()
        self.connections = Connections(self._bump)
        self.metrics = Metrics(Live(lambda: [
            EngineLive(e.cfg.name, e.state, e.busy, e.waiting,
                       accumulate(e.state_seconds, e.state, e.state_since))
            for e in self.engines.values()
        ], functools.partial(gpustatus.gpus_live, fleet), functools.partial(gpustatus.held_live, fleet)))
        self.page = Page(cfg, fleet, self.status_now, self.connections.detached)
        self.own = Endpoints(self, fleet, self.metrics, self.page, time.time())
        self.edge = Edge(self, self.connections)
        self.handle = self.edge.handle  # each client connection (trio.serve_listeners)

    def apply_config(self, cfg: GatewayConfig) -> None:
        """A reload's new configuration (reloading.reload is the caller)."""
        # the page too: its stream checks the keys a reload may have changed
        self.cfg = self.fleet.cfg = self.page.cfg = cfg

    async def status_now(self) -> GatewayStatus:
        """/gateway/status as of now (endpoints.py builds it)."""
        return await self.own.status_now()

    # ---- requests (edge.Served) ----

    async def answer(
        self, client: ClientSide, req: h11.Request, route: Route, body: bytes, request_id: str,
        ex: Exchange,
    ) -> Exchange:
        """The dispatch step picks what serves the request (edge.Served)."""
        if route.kind is Kind.ENGINE:
            self.page.bump()  # one more in flight
        step = dispatch(route, req.method.decode("ascii", "replace"), body, self._routing(),
                        first_ready=self.fleet.first.ready)
        match step:
            case Own(kind):
                return await self.own.answer(client, req, route, kind)
            case ConfiguredModels():
                return await self.own.models(client)
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

    def request_done(self, method: str, route: Route, ex: Exchange, seconds: float) -> None:
        """The request's metrics and its line on the status page (edge.Served)."""
        label = route.label
        self.metrics.request(label, ex.status, seconds, ex.tool_calls, ex.outcome)
        self.page.request_done(method, route.path, label, ex.model, ex.status, seconds, ex.waited_s)

    # ---- changes, the status for systemd, the idle exit ----

    def _bump(self) -> None:
        """Wake whoever waits for a change (the status loop, the idle exit)."""
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def engine_event(self, name: str, event: events.EngineEvent) -> None:
        """What the engine `name` reported (its owner calls this)."""
        self.metrics.engine_event(name, event)
        self.page.engine_event(name, event)

    def engine_changed(self) -> None:
        """The engine's state changed: wake the status loop and the idle exit."""
        self._bump()
        self.page.bump()

    def shim_status(self, e: Engine) -> ShimStatus:
        return ShimStatus(state=e.state.value, in_flight=e.busy, idle_since=e.idle_since, unit=e.cfg.unit,
                          can_sleep=e.sleep_enabled or e.cfg.sleep_after_s is None)

    def publish_status(self) -> None:
        """Send the STATUS text (the status loop calls it on every change)."""
        self.notifier.status(format_statuses([self.shim_status(e) for e in self.engines.values()],
                                             time.time()))

    async def status_loop(self) -> None:
        """Keep systemd's STATUS current: sent on every change (engine state,
        in flight 0 <-> 1) and with each watchdog ping. The status carries
        the absolute idle_since, so it never needs a timer to stay true;
        when nothing happens the shim wakes only for the watchdog."""
        watchdog = Notifier.watchdog_interval_s()
        all_stopped = False
        while True:
            self.publish_status()
            self.notifier.watchdog()
            was, all_stopped = all_stopped, all(e.state is State.STOPPED and not e.busy
                                                for e in self.engines.values())
            if all_stopped and not was:  # the gateway idles: what the traffic left goes back
                footprint.give_back()
            with trio.move_on_after(watchdog if watchdog else math.inf):
                await self._changed.wait()

    async def exit_when_idle(self, cancel: trio.CancelScope) -> None:
        """With the engine stopped and no connection for exit_after, stop
        serving: the socket unit keeps the port and starts us again. Waits on
        changes and one deadline, not a polling timer."""
        limit = self.cfg.exit_after_s
        if limit is None:
            return
        while True:
            changed = self._changed
            if (
                all(e.state is State.STOPPED and e.waiting == 0 for e in self.engines.values())
                and self.connections.open == 0
            ):
                with trio.move_on_at(self.connections.last_change + limit) as deadline:
                    await changed.wait()
                if deadline.cancelled_caught:
                    log.info("engine stopped and no client for %g s: exiting until the next connection",
                             limit)
                    cancel.cancel()
                    return
            else:
                await changed.wait()
