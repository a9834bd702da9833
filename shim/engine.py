"""The one owner of an engine's lifecycle.

A single trio task (`Engine.run`) owns the state and alone writes it.
Everything that wants to change it — request handlers, admin calls, the
fleet, systemd's signals, the start attempt's health probe — posts a
message to its inbox (a step's result tagged with its attempt, so that a
stale one is dropped), and the owner takes them one at a time, in order.

A request that finds the engine ready takes a `Lease` (`take_lease`) and
tells the owner, which counts every lease taken so before it decides
anything else (a sleep, an idle stop, a drain): none is decided on a count
that misses a request already served. Otherwise the request asks and waits
for the owner's answer: a lease once the start or wake it begins is done;
an error when that failed or too many wait; or "wait at the fleet's gate,
then ask again". Giving a lease back (`return_lease`) is a message too. The
fleet asks and waits for the owner to take it in: `admit`, `drain`,
`undrain`.

Others read the state through read-only properties; the fleet plans with a
`Report`, the snapshot that `report` gives.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import assert_never

import trio

from . import events, idle_check, journal, learned, portcheck, startcheck, stopping
from .config import EngineConfig
from .errors import EngineUnavailable, GatewayError, QueueFull
from .lifecycle import AWAKE, Event, State, next_state
from .systemd import (
    GONE,
    ActiveStateChanged,
    JobDone,
    MainExited,
    ManagerBack,
    Systemd,
    SystemdError,
    TransientService,
    UnitRemoved,
    UnitSignal,
    UnitState,
)
from .upstream import Upstream, call, probe

log = logging.getLogger("vllm_gateway.engine")

# vLLM answers /health within ~100 ms of its engine being ready; poll at half
# of that so a waiting request is released within 100 ms (the brief's bound).
HEALTH_POLL_S = 0.05
# Cool-down after a failed start: first 5 s, doubling, at most 2 min. Clients
# get a 503 with Retry-After meanwhile instead of relaunching vLLM each time.
FAILURE_COOLDOWN_S = 5.0
FAILURE_COOLDOWN_MAX_S = 120.0
# vLLM's first sleep took 43 s on an 80 GB setup (later ones ~6 s); waking
# ~1.5 s, but a level-2 wake reloads the weights from disk.
SLEEP_TIMEOUT_S = 180.0
WAKE_TIMEOUT_S = 300.0
# Runs the idle check while an engine runs (units/vllm-gateway-idle.timer):
# each engine's unit wants it, and systemd stops it when none does.
IDLE_TIMER = "vllm-gateway-idle.timer"
# vLLM's banner with its version is among a start's first lines; a start
# logs a few hundred.
VERSION_LINES = 2000
# How vLLM (e.g. its CPU build) says that it cannot sleep at all.
_SLEEP_REFUSED = re.compile(r"sleep mode is not supported|enable.sleep.mode", re.IGNORECASE)


@dataclass(frozen=True)
class _Stop:
    cause: str
    only_if_idle: bool = False
    detail: str = ""  # e.g. who the GPU is yielded to, for the clients cut
    # the idle check's stop_after, read from the configuration on its tick:
    # it applies to a running engine without a reload
    stop_after_s: float | None = None


@dataclass(frozen=True)
class _GraceOver:
    attempt: int


@dataclass(frozen=True)
class _Version:
    """The vLLM version a start reported in its output."""

    version: str


@dataclass(frozen=True)
class _UnitChanged:
    signal: UnitSignal


@dataclass(frozen=True)
class _Healthy:
    attempt: int
    asleep: bool = False


@dataclass(frozen=True)
class _Sleep:
    cause: str
    only_if_idle: bool = False
    # the idle check's sleep_after, read from the configuration on its tick
    sleep_after_s: float | None = None


@dataclass(frozen=True)
class _Slept:
    attempt: int


@dataclass(frozen=True)
class _SleepFailed:
    attempt: int
    reason: str
    unsupported: bool


@dataclass(frozen=True)
class _WakeFailed:
    attempt: int
    reason: str


@dataclass(frozen=True)
class _Reconfigure:
    cfg: EngineConfig  # applies now
    restart_with: EngineConfig | None  # applies at the next start; restart when idle


@dataclass(frozen=True)
class _Idle:
    pass


@dataclass(frozen=True)
class _StartFailed:
    attempt: int
    reason: str


@dataclass(eq=False)
class Lease:
    """One request's hold on a ready engine, granted by its owner
    (`Engine.take_lease`): while any is out, the owner does not put the
    engine to sleep, and a stop or an eviction gives its request a grace.
    Given back once (`Engine.return_lease`)."""

    engine: str
    waited_s: float  # what the request waited for the engine to be ready
    serial: int
    # set by the request that holds it, when it gives it back
    returned: bool = field(default=False, compare=False)


class _ToGate:
    """The owner's answer to a request for an engine that holds no GPU
    memory, or makes room: wait at the fleet's gate, then ask again."""


_TO_GATE = _ToGate()
_SERIALS = itertools.count(1)  # of leases, across engines


@dataclass(frozen=True)
class _Ticket:
    """A request's ask for a lease, the same for each time it asks."""

    max_waiting: int
    t0: float  # trio time of its first ask
    seen: int  # the failures counted then: a later one fails it


@dataclass(eq=False)
class _Reply:
    """Where the owner puts its answer to one ask, once."""

    answer: Lease | GatewayError | _ToGate | None = None
    done: trio.Event = field(default_factory=trio.Event)


@dataclass(frozen=True, eq=False)
class _Ask:
    """A request wants a lease (`from_gate`: having passed the fleet's gate)."""

    ticket: _Ticket
    reply: _Reply
    from_gate: bool = False


@dataclass(frozen=True)
class _Withdraw:
    """The request left while it waited for the answer to `ask`: a lease
    granted meanwhile comes back."""

    ask: _Ask


@dataclass(frozen=True)
class _LeftGate:
    """A request that the owner sent to the fleet's gate left it without passing."""


@dataclass(frozen=True)
class _Taken:
    """A request took a lease of the engine it saw ready (`take_lease`)."""

    lease: Lease


@dataclass(frozen=True)
class _Return:
    lease: Lease


@dataclass(frozen=True)
class _Admit:
    swapped: bool
    done: trio.Event


@dataclass(frozen=True)
class _Drain:
    action: str
    cause: str
    detail: str
    done: trio.Event


@dataclass(frozen=True)
class _Undrain:
    done: trio.Event


@dataclass(frozen=True)
class _GraceEnded:
    """The grace for the requests in flight ended (they finished, or were cut)."""


_Message = (
    _Stop | _GraceOver | _Version | _UnitChanged | _Healthy | _StartFailed | _Sleep | _Slept
    | _SleepFailed | _WakeFailed | _Reconfigure | _Idle | _Ask | _Withdraw | _LeftGate | _Taken | _Return
    | _Admit | _Drain | _Undrain | _GraceEnded
)


@dataclass(frozen=True)
class Report:
    """An engine as its owner reports it at one instant: what the fleet
    plans with."""

    state: State
    active: int  # leases out
    wanted: int  # requests waiting past the fleet's gate
    last_used: float  # trio time
    awake_since: float  # trio time it last became ready, or was admitted
    reserved: bool
    draining: bool
    sleep_enabled: bool

    @property
    def holds_memory(self) -> bool:
        return self.reserved or self.state in AWAKE


@dataclass(frozen=True)
class Failure:
    message: str
    at: float  # epoch seconds
    seq: int


@dataclass(frozen=True)
class Problem:
    """The last error, as status shows it: one line, when, and whether a
    start succeeded since."""

    message: str
    at: float  # epoch seconds
    past: bool = False


class Engine:
    """One engine behind the gateway, as a transient systemd unit."""

    def __init__(
        self,
        cfg: EngineConfig,
        systemd: Systemd,
        on_change: Callable[[], None] = lambda: None,
        slice: str | None = None,
        store: learned.Store | None = None,
        on_event: Callable[[events.EngineEvent], None] = lambda event: None,
    ):
        self.cfg = cfg
        self.slice = slice  # the systemd slice to run in (the fake GPU's)
        self.systemd = systemd
        self.upstream = Upstream(cfg.port)
        self.state = State.STOPPED
        self.state_since = time.time()
        self.main_pid = 0
        self.last_cold_start_s: float | None = None
        self.last_failure: Failure | None = None
        self.last_error: Problem | None = None
        # what earlier shims learned about this command (sleep refused, start time)
        self.store = store if store is not None else learned.Store.default()
        self._facts_key = learned.engine_key(cfg.command, cfg.environment)
        self.facts = self.store.get(self._facts_key)
        self._cold_since: float | None = None  # when the start the first client waits for began
        # The requests' hold on the engine, written by the owner task alone
        # (requests ask it: `take_lease`, `return_lease`); read them through
        # the properties below.
        self._waiters: list[_Ask] = []  # past the fleet's gate, waiting for it to be ready
        self._at_gate = 0  # requests the owner sent to wait at the fleet's gate
        self._leases: set[int] = set()  # the serials of the leases out
        self._last_used = 0.0  # trio time a lease was last taken or given back
        # epoch seconds since nothing is in flight or waiting; None while busy
        self._idle_since: float | None = time.time()
        self._on_change = on_change
        self._on_event = on_event  # what it reports as it goes: to metrics and the status page
        self.state_seconds: dict[State, float] = {}
        self._stop_cause = ""  # why the unit is going away, when we know it
        self._cut_message = ""  # what clients cut by that stop are told
        self._lease_ended = trio.Event()  # set (and replaced) whenever a request ends
        self._cutting = False  # a grace for the requests in flight runs
        self._changed = trio.Event()
        self._inbox_send, self._inbox = trio.open_memory_channel[_Message](math.inf)
        self._deferred: collections.deque[_Message] = collections.deque()  # taken from the inbox, in order
        self._attempt = 0
        self._attempt_scope: trio.CancelScope | None = None
        self._start_t0 = 0.0
        self._start_epoch = 0.0
        self._failures_in_row = 0
        self._retry_at = 0.0  # trio time before which no new start is tried
        # whether this start attempt's unit was seen running: a new transient
        # unit first reports "inactive", which is not a failure
        self._seen_running = False
        self._start_job = ""  # D-Bus path of this attempt's start job
        self._exit_cause: str | None = None  # what the unit's exit status says of this attempt
        self._adopted = False
        # a configuration reload changed the command line: the next start
        # uses this one, and the running engine is restarted once idle
        self.restart_with: EngineConfig | None = None
        self._restart_now = False
        # set once the engine showed it cannot sleep (now or, as learned, before);
        # then only the stop tier applies
        self.sleep_refused = self.facts.sleep_refused is not None
        self.last_wake_s: float | None = None
        self.last_sleep_error: str | None = self.facts.sleep_refused
        # Several engines share the GPU: a request for an engine that holds
        # no memory passes the fleet's gate first (None: no gate), which
        # admits it (`admit`) once it fits; an engine that must make room
        # drains (`drain`): new requests wait at the gate meanwhile.
        self._gate: Callable[[Engine], Awaitable[None]] | None = None
        self._on_drained: Callable[[], None] = lambda: None
        self._reserved = False
        self._draining = False
        self._awake_since = 0.0  # trio time it last became ready, or was admitted

    @property
    def sleep_enabled(self) -> bool:
        return self.cfg.sleep_after_s is not None and not self.sleep_refused

    # ---- read by anyone (the owner alone writes) ----

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def holds_memory(self) -> bool:
        """Awake, or admitted to wake or start."""
        return self._reserved or self.state in AWAKE

    @property
    def reserved(self) -> bool:
        """Admitted by the fleet to take its memory, and not yet awake."""
        return self._reserved

    @property
    def draining(self) -> bool:
        """Making room on the GPU: new requests wait at the fleet's gate."""
        return self._draining

    @property
    def awake_since(self) -> float:
        """The trio time it last became ready, or was admitted to."""
        return self._awake_since

    def report(self) -> Report:
        """What the fleet plans with, as of now."""
        return Report(self.state, self.active, len(self._waiters), self._last_used,
                      self._awake_since, self._reserved, self._draining, self.sleep_enabled)

    @property
    def active(self) -> int:
        """Requests holding a lease: the engine must stay awake."""
        return len(self._leases)

    @property
    def waiting(self) -> int:
        """Requests waiting for the engine to be ready (those at the gate included)."""
        return len(self._waiters) + self._at_gate

    @property
    def queued(self) -> int:
        """Requests waiting at the fleet's gate (part of `waiting`)."""
        return self._at_gate

    @property
    def last_used(self) -> float:
        """The trio time a lease was last taken or given back."""
        return self._last_used

    @property
    def idle_since(self) -> float | None:
        """Epoch seconds since nothing is in flight or waiting; None while busy."""
        return self._idle_since

    @property
    def busy(self) -> int:
        """Requests in flight or waiting for this engine."""
        return self.active + self.waiting

    @property
    def backlog(self) -> int:
        """Messages waiting for the owner task (it takes all of them at each
        turn, so this stays within a few per request in flight)."""
        return self._inbox.statistics().current_buffer_used + len(self._deferred)

    def idle_verdict(self, now: float, *, stop_after_s: float | None = None,
                     sleep_after_s: float | None = None) -> idle_check.Verdict:
        """What the idle check's rule says of the engine at `now` (epoch
        seconds), on its live state: requests past the gate count as in flight.
        `stop_after_s`, `sleep_after_s`: the thresholds the idle check read,
        where it sent them."""
        cfg = self.cfg
        if stop_after_s is not None:
            cfg = replace(cfg, stop_after_s=stop_after_s)
        if sleep_after_s is not None:
            cfg = replace(cfg, sleep_after_s=sleep_after_s)
        idle_s = 0.0 if self._idle_since is None else max(0.0, now - self._idle_since)
        can_sleep = self.sleep_enabled or cfg.sleep_after_s is None
        return idle_check.verdict(cfg, self.state.value, self.active + len(self._waiters), idle_s, can_sleep)

    def in_state(self, *states: State) -> bool:
        """The state now (a call, so that type checkers do not narrow it across awaits)."""
        return self.state in states

    # ---- asked by request handlers (their tasks) ----

    async def take_lease(self, max_waiting: int) -> Lease:
        """Hold the engine awake for one request, once it is ready; give the
        lease back with `return_lease`.

        The owner grants it: at once when the engine is ready, else once a
        start or wake it begins for the request is done. Raises
        EngineUnavailable when that start failed, or while cooling down
        after failures; QueueFull past `max_waiting` waiting; the fleet's
        errors (GpuBusy, GpuYielded) from its gate.
        """
        if self.ready and not self._draining:
            # the common case: no wait, so no answer to wait for; the owner
            # counts the lease before it decides anything else
            lease = Lease(self.cfg.name, 0.0, next(_SERIALS))
            self._inbox_send.send_nowait(_Taken(lease))
            return lease
        failure = self.last_failure
        ticket = _Ticket(max_waiting, trio.current_time(), failure.seq if failure else 0)
        from_gate = False
        while True:
            ask = _Ask(ticket, _Reply(), from_gate)
            self._inbox_send.send_nowait(ask)
            try:
                await ask.reply.done.wait()
            except BaseException:
                self._inbox_send.send_nowait(_Withdraw(ask))
                raise
            answer = ask.reply.answer
            if isinstance(answer, Lease):
                return answer
            if isinstance(answer, GatewayError):
                raise answer
            assert self._gate is not None and answer is _TO_GATE
            try:
                await self._gate(self)
            except BaseException:
                self._inbox_send.send_nowait(_LeftGate())
                raise
            from_gate = True

    def return_lease(self, lease: Lease) -> None:
        """The request is done with the engine (however it ended)."""
        if lease.engine != self.cfg.name or lease.returned:
            raise ValueError(f"engine {self.cfg.name}: lease {lease.serial} of {lease.engine} is not out")
        lease.returned = True
        self._inbox_send.send_nowait(_Return(lease))

    @asynccontextmanager
    async def lease(self, max_waiting: int) -> AsyncIterator[Lease]:
        """`take_lease` and `return_lease` around a block."""
        lease = await self.take_lease(max_waiting)
        try:
            yield lease
        finally:
            self.return_lease(lease)

    async def acquire(self, max_waiting: int) -> float:
        """Return once the engine is ready (as a lease taken and given back at
        once); the seconds waited for it. Raises as `take_lease` does."""
        lease = await self.take_lease(max_waiting)
        self.return_lease(lease)
        return lease.waited_s

    # ---- asked by the fleet (its task) ----

    def join_fleet(self, gate: Callable[[Engine], Awaitable[None]], on_drained: Callable[[], None]) -> None:
        """Several engines share the GPU: requests for this one while it holds
        no memory, or drains, wait at `gate`; `on_drained` is called once the
        last request in flight of a draining engine ends. Before `run`."""
        self._gate = gate
        self._on_drained = on_drained

    async def admit(self, *, swapped: bool = False) -> None:
        """The fleet lets the engine take its GPU memory: it counts as holding
        it, and as just used and swapped in, from the owner's answer on. The
        admission ends once it is awake, or when no request past the gate
        waits for it. `swapped`: others made room for it."""
        await self._ask(_Admit(swapped, trio.Event()))

    async def drain(self, action: str, cause: str, detail: str) -> None:
        """Make room on the GPU: new requests wait at the fleet's gate; those
        in flight (or past the gate) finish within stop_grace, then the fleet
        asks again; without any, the engine sleeps (`action` "sleep", where it
        can) or stops. `detail` names who the room is for. Returns once the
        owner took it in."""
        await self._ask(_Drain(action, cause, detail, trio.Event()))

    async def undrain(self) -> None:
        """It no longer needs to make room: requests may use it again."""
        await self._ask(_Undrain(trio.Event()))

    async def _ask(self, msg: _Admit | _Drain | _Undrain) -> None:
        self._inbox_send.send_nowait(msg)
        await msg.done.wait()

    # ---- asked by anyone: the owner acts on its next step ----

    def request_sleep(self, cause: str, *, only_if_idle: bool = False,
                      sleep_after_s: float | None = None) -> None:
        """Put a ready engine to sleep, unless requests are in flight or wait;
        `only_if_idle` (the idle check): unless the engine's own idle rule,
        with `sleep_after_s` where given, says otherwise now."""
        self._inbox_send.send_nowait(_Sleep(cause, only_if_idle, sleep_after_s))

    async def wait_changed(self, timeout_s: float) -> None:
        """Wait until the state changes, or the timeout passes."""
        changed = self._changed
        with trio.move_on_after(timeout_s):
            await changed.wait()

    def reconfigure(self, cfg: EngineConfig, restart_with: EngineConfig | None = None) -> None:
        """A reload: `cfg` applies at once, `restart_with` at the next start."""
        self._inbox_send.send_nowait(_Reconfigure(cfg, restart_with))

    def request_stop(self, cause: str, *, only_if_idle: bool = False, detail: str = "",
                     stop_after_s: float | None = None) -> None:
        self._inbox_send.send_nowait(_Stop(cause, only_if_idle, detail, stop_after_s))

    async def wait_for(self, *states: State, timeout_s: float) -> bool:
        with trio.move_on_after(timeout_s):
            while self.state not in states:
                await self._changed.wait()
            return True
        return False

    # ---- the owner task ----

    def _cut_after_grace(self, cause: str, detail: str = "") -> None:
        """Let the requests in flight finish within stop_grace, then close
        their engine connections (they fail with a message naming `cause`)."""
        if self._cutting or not self.active:
            return
        self._cutting = True
        self._nursery.start_soon(self._grace, stopping.cut_message(self.cfg.name, cause, detail),
                                 cause in stopping.RETRY_UNANSWERED)

    async def _grace(self, message: str, retry: bool) -> None:
        try:
            with trio.move_on_after(self.cfg.stop_grace_s):
                while self.active:
                    await self._lease_ended.wait()
            if self.active:
                cut = self.upstream.cut(message, retry=retry)
                log.warning("engine %s: %d requests still in flight after the grace of %g s were cut",
                            self.cfg.name, cut, self.cfg.stop_grace_s)
        finally:
            self._inbox_send.send_nowait(_GraceEnded())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.systemd.watch(self.cfg.unit) as signals, trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._adopt(await self.systemd.unit_state(self.cfg.unit))
            nursery.start_soon(self._forward_signals, signals)
            task_status.started()
            while True:
                if not self._deferred:
                    self._deferred.append(await self._inbox.receive())
                self._take_inbox()
                await self._handle(self._deferred.popleft())
                await self._serve_waiters()

    def _take_inbox(self) -> None:
        """Take every message waiting in the inbox at once (a receive would
        yield to the scheduler after each, and requests post two each), and
        count the leases taken before anything else is decided: a request
        that saw the engine ready took its lease in that same step, and a
        sleep, stop or drain asked before it must not miss it. The other
        messages keep their order."""
        if not self._inbox.statistics().current_buffer_used:
            return
        while True:
            try:
                msg = self._inbox.receive_nowait()
            except trio.WouldBlock:
                return
            if isinstance(msg, _Taken):
                self._on_taken(msg.lease)
            else:
                self._deferred.append(msg)

    async def _forward_signals(self, signals: trio.MemoryReceiveChannel[UnitSignal]) -> None:
        async for signal in signals:
            await self._inbox_send.send(_UnitChanged(signal))

    async def _adopt(self, unit: UnitState) -> None:
        """Take over whatever the unit is doing now (e.g. after a shim restart)."""
        if unit.running:
            log.info("adopting %s (%s, pid %d)", self.cfg.unit, unit.active_state, unit.main_pid)
            self.main_pid = unit.main_pid
            self._begin_start(adopted=True)
        elif unit.active_state == "deactivating":
            self._set(Event.UNIT_DEACTIVATING)
        elif unit.active_state == "failed":
            await self.systemd.reset_failed(self.cfg.unit)

    async def _handle(self, msg: _Message) -> None:
        match msg:
            case _Stop(cause, only_if_idle, detail, stop_after_s):
                await self._on_stop(cause, only_if_idle, detail, stop_after_s)
            case _GraceOver(attempt) if attempt == self._attempt and self.state is State.STOPPING:
                self._attempt_scope = None
                await self._stop_unit()
            case _UnitChanged(signal):
                await self._on_unit(signal)
            case _Healthy(attempt, asleep) if attempt == self._attempt and self.state is State.STARTING:
                took = time.monotonic() - self._start_t0
                self._failures_in_row = 0
                self._cancel_attempt()
                if asleep:
                    log.info("engine %s was adopted asleep", self.cfg.name)
                    self._set(Event.FOUND_ASLEEP)
                    await self._on_want()
                    return
                # what the first client waited: a restart without sleep mode included
                waited = took if self._cold_since is None else time.monotonic() - self._cold_since
                self._cold_since = None
                self.last_cold_start_s = waited
                self._on_event(events.ColdStart(waited))
                self.main_pid = (await self.systemd.unit_state(self.cfg.unit)).main_pid
                log.info("engine %s ready after %.1f s", self.cfg.name, took)
                if self.last_error is not None:
                    self.last_error = replace(self.last_error, past=True)
                if not self._adopted:
                    self._remember(replace(self.facts, start_s=round(took, 1)))
                    self._nursery.start_soon(self._read_version, self._start_epoch)
                self._set(Event.HEALTHY)
            case _Healthy(attempt) if attempt == self._attempt and self.state is State.WAKING:
                took = time.monotonic() - self._start_t0
                self._cancel_attempt()
                self.last_wake_s = took
                self._on_event(events.Wake(took))
                log.info("engine %s awake after %.2f s", self.cfg.name, took)
                self._set(Event.HEALTHY)
            case _Sleep(cause, only_if_idle, sleep_after_s):
                await self._on_sleep(cause, only_if_idle, sleep_after_s)
            case _Slept(attempt) if attempt == self._attempt and self.state is State.GOING_TO_SLEEP:
                self._cancel_attempt()
                log.info("engine %s asleep (level %d) after %.1f s", self.cfg.name,
                         self.cfg.sleep_level, time.monotonic() - self._start_t0)
                self._on_event(events.Sleep())
                self._set(Event.SLEPT)
                await self._on_want()  # requests that arrived meanwhile wake it again
            case _SleepFailed(attempt, reason, unsupported) if attempt == self._attempt:
                self._cancel_attempt()
                self.last_sleep_error = reason
                if unsupported and not self.sleep_refused:
                    self.sleep_refused = True
                    self.last_sleep_error = learned.one_line(reason)
                    self._remember(replace(self.facts, sleep_refused=self.last_sleep_error))
                    log.warning("engine %s cannot sleep (%s); it will be stopped when idle instead",
                                self.cfg.name, reason)
                else:
                    log.warning("engine %s did not go to sleep: %s", self.cfg.name, reason)
                if self.state is State.GOING_TO_SLEEP:
                    self._set(Event.SLEEP_FAILED)
            case _WakeFailed(attempt, reason) if attempt == self._attempt and self.state is State.WAKING:
                self._cancel_attempt()
                log.error("engine %s failed to wake (%s): stopping it; the next request starts it cold",
                          self.cfg.name, reason)
                self._stop_cause = "failure"
                self._set(Event.WAKE_FAILED)
                await self.systemd.stop_unit(self.cfg.unit)
            case _StartFailed(attempt, reason) if attempt == self._attempt:
                await self._fail(reason)
            case _Reconfigure(cfg, restart_with):
                self.cfg = cfg
                self.restart_with = restart_with
                await self._restart_if_idle()
            case _Idle():
                await self._restart_if_idle()
            case _Ask():
                self._on_ask(msg)
            case _Taken(lease):
                self._on_taken(lease)
            case _Return(lease):
                self._on_return(lease)
            case _Withdraw(ask):
                self._on_withdraw(ask)
            case _LeftGate():
                before = self.busy
                self._at_gate -= 1
                self._settle_reservation()
                self._busy_changed(before)
            case _Admit(swapped, done):
                self._reserved = self.state not in AWAKE
                self._last_used = self._awake_since = trio.current_time()
                if swapped:
                    self._on_event(events.Swap())
                done.set()
            case _Drain(action, cause, detail, done):
                self._on_drain(action, cause, detail)
                done.set()
            case _Undrain(done):
                self._draining = False
                done.set()
            case _GraceEnded():
                self._cutting = False
            case _Version(version):
                facts = self.facts.seen_version(version)
                if facts.sleep_refused is None and self.facts.sleep_refused is not None:
                    log.info("engine %s now runs vLLM %s (not %s): sleep mode is tried again at its next "
                             "start", self.cfg.name, version, self.facts.vllm_version)
                if facts != self.facts:
                    self._remember(facts)
            case _:
                pass  # a stale message from an earlier attempt

    # ---- the requests' hold, as the owner keeps it ----

    @property
    def _wanted(self) -> bool:
        """Requests wait for this engine past the gate: start or wake it."""
        return bool(self._waiters) and not self._draining

    def _on_ask(self, ask: _Ask) -> None:
        before = self.busy
        if ask.from_gate:
            self._at_gate -= 1
        if ask.from_gate or not (self.ready and not self._draining):
            if not ask.from_gate and self.waiting >= ask.ticket.max_waiting:
                self._answer(ask, QueueFull(
                    f"vllm-gateway: {self.waiting} requests already wait for the engine to start; "
                    "try again", retry_after_s=5,
                ))
            else:
                self._waiters.append(ask)
        else:  # ready: no wait
            self._answer(ask, self._grant(0.0))
        self._busy_changed(before)

    async def _serve_waiters(self) -> None:
        """Answer the requests waiting past the gate that can be answered now;
        start or wake the engine for the others."""
        if not self._waiters:
            return
        self._answer_waiters()
        if self._wanted:
            await self._on_want()
            self._answer_waiters()

    def _answer_waiters(self) -> None:
        before = self.busy
        now = trio.current_time()
        failure = self.last_failure
        for ask in list(self._waiters):
            answer: Lease | GatewayError | _ToGate
            if self.ready and not self._draining:
                answer = self._grant(now - ask.ticket.t0)
            elif failure is not None and failure.seq != ask.ticket.seen:
                answer = self._unavailable(failure)  # the start it waited for failed
            elif failure is not None and self.state is State.FAILED and now < self._retry_at:
                answer = self._unavailable(failure)  # cooling down
            elif self._gate is not None and (self._draining or not self.holds_memory):
                answer = _TO_GATE
                self._at_gate += 1
            else:
                continue
            self._waiters.remove(ask)
            self._answer(ask, answer)
        self._settle_reservation()
        self._busy_changed(before)

    @staticmethod
    def _answer(ask: _Ask, answer: Lease | GatewayError | _ToGate) -> None:
        ask.reply.answer = answer
        ask.reply.done.set()

    def _grant(self, waited_s: float) -> Lease:
        lease = Lease(self.cfg.name, waited_s, next(_SERIALS))
        self._on_taken(lease)
        return lease

    def _on_taken(self, lease: Lease) -> None:
        before = self.busy
        self._leases.add(lease.serial)
        self._last_used = trio.current_time()
        self._busy_changed(before)

    def _on_return(self, lease: Lease) -> None:
        if lease.serial not in self._leases:
            log.error("engine %s: lease %d given back but not out", self.cfg.name, lease.serial)
            return
        before = self.busy
        self._leases.remove(lease.serial)
        self._last_used = trio.current_time()
        ended, self._lease_ended = self._lease_ended, trio.Event()
        ended.set()
        self._busy_changed(before)
        if not self._leases and self._draining:
            self._on_drained()

    def _on_withdraw(self, ask: _Ask) -> None:
        """The request left before it read its answer: undo what it was given."""
        before = self.busy
        answer = ask.reply.answer
        if ask in self._waiters:
            self._waiters.remove(ask)
        elif isinstance(answer, Lease):
            self._on_return(answer)  # never seen by the request, so never given back by it
        elif answer is _TO_GATE:
            self._at_gate -= 1
        self._settle_reservation()
        self._busy_changed(before)

    def _busy_changed(self, before: int) -> None:
        now = self.busy
        if (before == 0) != (now == 0):
            self._idle_since = time.time() if now == 0 else None
            self._on_change()
            if now == 0 and self.restart_with is not None:
                self._inbox_send.send_nowait(_Idle())

    def _unavailable(self, failure: Failure) -> EngineUnavailable:
        retry = max(1.0, self._retry_at - trio.current_time())
        return EngineUnavailable(failure.message, retry_after_s=retry)

    def _settle_reservation(self) -> None:
        if self._reserved and (self.state in AWAKE or not self._waiters):
            self._reserved = False

    def _on_drain(self, action: str, cause: str, detail: str) -> None:
        self._draining = True
        if self.active > 0 or self._waiters:
            # those in flight get their grace; those waiting go to the gate
            self._cut_after_grace(cause, detail)
            return
        if action == "sleep" and self.state is State.READY and self.sleep_enabled:
            self.request_sleep(cause)
        elif self.state in (State.STARTING, State.READY, State.WAKING, State.SLEEPING):
            self.request_stop(cause, detail=detail)

    async def _on_want(self) -> None:
        if self.state is State.FAILED and trio.current_time() >= self._retry_at:
            self._set(Event.RESET)
        if self.state is State.STOPPED and self._wanted:
            await self._start()
        elif self.state is State.SLEEPING and self._wanted:
            self._set(Event.WAKE)
            self._spawn_attempt(self._wake)

    async def _on_sleep(self, cause: str, only_if_idle: bool = False,
                        sleep_after_s: float | None = None) -> None:
        if self.state is not State.READY or not self.sleep_enabled:
            return
        if self.active > 0 or self._wanted:
            log.info("not putting engine %s to sleep (%s): %d requests in flight",
                     self.cfg.name, cause, self.active + len(self._waiters))
            return
        if only_if_idle:
            verdict = self.idle_verdict(time.time(), sleep_after_s=sleep_after_s)
            if verdict.action is not idle_check.Action.SLEEP:
                # the idle check read a status that a request has made stale
                log.info("not putting engine %s to sleep (%s): %s", self.cfg.name, cause, verdict.reason)
                return
        log.info("putting engine %s to sleep at level %d (%s)", self.cfg.name, self.cfg.sleep_level, cause)
        self._set(Event.SLEEP)
        self._spawn_attempt(self._sleep)

    def _spawn_attempt(self, fn: Callable[[int], Awaitable[None]]) -> None:
        """Run one step (start probe, sleep, wake) as this attempt's task;
        its result comes back to the inbox, tagged with the attempt."""
        self._cancel_attempt()
        self._attempt += 1
        self._start_t0 = time.monotonic()
        scope = trio.CancelScope()
        self._attempt_scope = scope
        attempt = self._attempt

        async def step() -> None:
            with scope:
                await fn(attempt)

        self._nursery.start_soon(step)

    async def _engine_call(self, method: str, path: str, body: bytes | None = None,
                           timeout_s: float = 60.0) -> tuple[int, bytes]:
        result = await call("127.0.0.1", self.cfg.port, method, path, body, timeout_s)
        if result is None:
            raise _StepFailed(f"{method} {path}: no answer")
        return result

    async def _is_sleeping(self) -> bool:
        status, body = await self._engine_call("GET", "/is_sleeping")
        if status != 200:
            raise _StepFailed(f"GET /is_sleeping answered {status}")
        try:
            return bool(json.loads(body)["is_sleeping"])
        except (ValueError, KeyError, TypeError):
            raise _StepFailed(f"GET /is_sleeping answered {body[:200]!r}") from None

    async def _sleep(self, attempt: int) -> None:
        # the level goes in the query string: vLLM ignores a JSON body
        path = f"/sleep?level={self.cfg.sleep_level}"
        try:
            with trio.fail_after(SLEEP_TIMEOUT_S):
                status, body = await self._engine_call("POST", path, timeout_s=SLEEP_TIMEOUT_S)
                if status != 200:
                    # 404: dev mode or sleep mode is off; the engine cannot sleep
                    await self._inbox_send.send(_SleepFailed(
                        attempt, f"POST {path} answered {status}: {body[:200].decode(errors='replace')}",
                        unsupported=status in (400, 404, 405, 501),
                    ))
                    return
                if not await self._is_sleeping():
                    raise _StepFailed("the engine answered the sleep call but is not sleeping")
        except (_StepFailed, trio.TooSlowError) as e:
            await self._inbox_send.send(_SleepFailed(attempt, str(e) or "timeout", unsupported=False))
            return
        await self._inbox_send.send(_Slept(attempt))

    async def _wake(self, attempt: int) -> None:
        """vLLM's wake sequence for the level it sleeps at, then a check."""
        if self.cfg.sleep_level == 2:
            steps = [
                ("POST", "/wake_up?tags=weights", None),
                ("POST", "/collective_rpc", b'{"method": "reload_weights"}'),
                ("POST", "/wake_up?tags=kv_cache", None),
                ("POST", "/reset_prefix_cache", None),
            ]
        else:
            steps = [("POST", "/wake_up", None)]
        try:
            with trio.fail_after(WAKE_TIMEOUT_S):
                for method, path, body in steps:
                    status, answer = await self._engine_call(method, path, body, WAKE_TIMEOUT_S)
                    if status != 200:
                        raise _StepFailed(f"{method} {path} answered {status}: "
                                          f"{answer[:200].decode(errors='replace')}")
                if await self._is_sleeping():
                    raise _StepFailed("the engine still reports that it sleeps")
        except (_StepFailed, trio.TooSlowError) as e:
            reason = str(e) or f"no wake within {WAKE_TIMEOUT_S:g} s"
            await self._inbox_send.send(_WakeFailed(attempt, reason))
            return
        await self._inbox_send.send(_Healthy(attempt))

    async def _restart_if_idle(self) -> None:
        if self.restart_with is None or self.busy or self.state not in (State.READY, State.SLEEPING):
            return  # a stopped engine takes the new command line at its next start
        log.info("restarting engine %s, idle, with its new command line", self.cfg.name)
        self._restart_now = True
        await self._on_stop("reconfigured")

    def _remember(self, facts: learned.Facts) -> None:
        self.facts = facts
        self.store.put(self._facts_key, facts)

    async def _read_version(self, since_epoch: float) -> None:
        """Learn which vLLM the start ran (its banner is among the first lines)."""
        version = learned.version_in(await journal.tail(self.cfg.unit, since_epoch, lines=VERSION_LINES))
        if version is not None:
            await self._inbox_send.send(_Version(version))

    async def _start(self) -> None:
        if self.restart_with is not None:
            self.cfg, self.restart_with = self.restart_with, None
            self.upstream = Upstream(self.cfg.port)
            # the learned facts belong to a command line: the new one learns its own
            self._facts_key = learned.engine_key(self.cfg.command, self.cfg.environment)
            self.facts = self.store.get(self._facts_key)
        if self._cold_since is None:
            self._cold_since = time.monotonic()
        # what is known now, learned by this shim or an earlier one
        self.sleep_refused = self.facts.sleep_refused is not None
        svc = TransientService(
            name=self.cfg.unit,
            argv=self.cfg.argv(sleep=self.sleep_enabled),
            environment=self.cfg.env(sleep=self.sleep_enabled),
            description=f"vLLM engine {self.cfg.name!r}, started by vllm-gateway",
            stop_timeout_s=self.cfg.stop_timeout_s,
            syslog_identifier=self.cfg.unit.removesuffix(".service"),
            slice=self.slice,
            wants=(IDLE_TIMER,),
        )
        self._start_epoch = time.time()
        self._start_job = ""
        self._exit_cause = None
        cannot_run = startcheck.problems(self.cfg.name, svc.argv, startcheck.unit_path(svc.environment))
        if cannot_run:
            self._begin_start(adopted=False)
            await self._fail("; ".join(cannot_run))
            return
        taken = await portcheck.port_taken(self.systemd, self.cfg.unit, self.cfg.port)
        if taken is not None:  # a stranger there would get the probe and the traffic
            self._begin_start(adopted=False)
            await self._fail(taken, quote_journal=False)
            return
        for first_try in (True, False):
            try:
                self._start_job = await self.systemd.start_transient(svc)
                break
            except SystemdError as e:
                if first_try and "UnitExists" in e.name:
                    unit = await self.systemd.unit_state(self.cfg.unit)
                    if unit.running:
                        await self._adopt(unit)
                        return
                    # a failed or stopping leftover: clear it and try once more
                    await self.systemd.reset_failed(self.cfg.unit)
                    continue
                self._begin_start(adopted=False)
                await self._fail(f"systemd refused to start {self.cfg.unit}: {e}")
                return
        log.info("starting engine %s as %s: %s", self.cfg.name, self.cfg.unit, " ".join(svc.argv))
        self._begin_start(adopted=False)

    def _begin_start(self, *, adopted: bool) -> None:
        self._set(Event.ADOPT if adopted else Event.START)
        self.upstream.reset()
        self._seen_running = adopted
        if adopted:
            self._start_epoch = time.time()
        self._adopted = adopted
        self._spawn_attempt(self._probe_until_healthy)

    def _cancel_attempt(self) -> None:
        if self._attempt_scope is not None:
            self._attempt_scope.cancel()
            self._attempt_scope = None

    async def _probe_until_healthy(self, attempt: int) -> None:
        deadline = trio.current_time() + self.cfg.start_timeout_s
        while trio.current_time() < deadline:
            if await probe("127.0.0.1", self.cfg.port, self.cfg.health_path) == 200:
                taken = await portcheck.port_taken(self.systemd, self.cfg.unit, self.cfg.port)
                if taken is not None:  # only the unit's own listener counts
                    await self._inbox_send.send(_StartFailed(attempt, taken))
                    return
                # an engine adopted after a shim restart may be asleep: a
                # request sent to it would break it
                asleep = False
                if self._adopted and self.cfg.sleep_after_s is not None:
                    try:
                        asleep = await self._is_sleeping()
                    except _StepFailed:
                        asleep = False  # no sleep endpoints: it cannot be asleep
                await self._inbox_send.send(_Healthy(attempt, asleep))
                return
            await trio.sleep(HEALTH_POLL_S)
        await self._inbox_send.send(_StartFailed(
            attempt, f"the engine did not become ready within {self.cfg.start_timeout_s:g} s",
        ))

    async def _fail(self, reason: str, *, quote_journal: bool = True) -> None:
        """A start failed: stop the unit, record why (with the engine's last
        words from the journal), and cool down before the next try."""
        self._cancel_attempt()
        self._stop_cause = "failure"
        unit = await self.systemd.unit_state(self.cfg.unit)
        cause = startcheck.exit_cause(unit.exec_main_code, unit.exec_main_status) or self._exit_cause
        reason = f"{reason}: {cause}" if cause else reason
        await self.systemd.stop_unit(self.cfg.unit)
        lines = journal.excerpt(await journal.settled_tail(self.cfg.unit, self._start_epoch)) \
            if quote_journal else []
        if self.sleep_enabled and any(_SLEEP_REFUSED.search(line) for line in lines):
            # e.g. vLLM's CPU build refuses --enable-sleep-mode: say so once,
            # remember it for later shims, and start again at once without it
            # (the stop tier still applies)
            reason = learned.sleep_refusal(lines) or learned.one_line(" | ".join(lines))
            self.sleep_refused = True
            self.last_sleep_error = reason
            self.last_error = Problem(f"sleep mode refused: {reason}", time.time())
            self._remember(replace(self.facts, sleep_refused=reason))
            log.warning("engine %s refused sleep mode (%s); starting it without sleep mode",
                        self.cfg.name, reason)
            self._set(Event.START_FAILED)
            self._set(Event.RESET)
            if self._wanted:
                await self._start()
            return
        self._failures_in_row += 1
        self._on_event(events.StartFailure())
        cooldown = min(FAILURE_COOLDOWN_MAX_S, FAILURE_COOLDOWN_S * 2 ** (self._failures_in_row - 1))
        self._retry_at = trio.current_time() + cooldown
        excerpt = ("; the engine's last output: " + " | ".join(lines)) if lines else ""
        message = f"vllm-gateway: the engine {self.cfg.name!r} failed to start: {reason}{excerpt}"
        seq = (self.last_failure.seq + 1) if self.last_failure else 1
        self.last_failure = Failure(message, time.time(), seq)
        self.last_error = Problem(learned.one_line(message), self.last_failure.at)
        self._cold_since = None
        log.error("%s (failure %d in a row; next try in %g s)", message, self._failures_in_row, cooldown)
        self._set(Event.START_FAILED)

    async def _on_stop(self, cause: str, only_if_idle: bool = False, detail: str = "",
                       stop_after_s: float | None = None) -> None:
        if self.state in (State.STOPPED, State.FAILED):
            # never trust "stopped" over the unit: a stop asked of a stopped
            # engine checks the unit, and a running one is adopted and stopped
            await self._unit_now(None)
        if self.state in (State.STARTING, State.READY, State.GOING_TO_SLEEP, State.SLEEPING, State.WAKING):
            verdict = self.idle_verdict(time.time(), stop_after_s=stop_after_s) if only_if_idle else None
            if verdict is not None and not verdict.stop:
                # the idle check read a status that a request has made stale
                log.info("not stopping engine %s (%s): %s", self.cfg.name, cause, verdict.reason)
                return
            self._stop_cause = cause
            self._cold_since = None
            self._cut_message = stopping.cut_message(self.cfg.name, cause, detail)
            self._cancel_attempt()
            self._set(Event.STOP)
            if self.active and cause in stopping.GRACEFUL:
                log.info("stopping engine %s (%s) once its %d requests in flight end, within %g s",
                         self.cfg.name, cause, self.active, self.cfg.stop_grace_s)
                self._cut_after_grace(cause, detail)
                self._spawn_attempt(self._wait_drained)
                return
            log.info("stopping engine %s (%s)", self.cfg.name, cause)
            await self._stop_unit()

    async def _wait_drained(self, attempt: int) -> None:
        """The grace of a stop: until no request is in flight (the cut ends them)."""
        while self.active:
            await self._lease_ended.wait()
        await self._inbox_send.send(_GraceOver(attempt))

    async def _stop_unit(self) -> None:
        """Stop the unit, closing our engine connections first: vLLM waits for
        open connections before it exits."""
        cut = self.upstream.cut(self._cut_message or stopping.cut_message(self.cfg.name, "stopped"),
                                retry=self._stop_cause in stopping.RETRY_UNANSWERED)
        if cut:
            log.warning("engine %s: %d requests in flight were cut by the stop", self.cfg.name, cut)
        await self.systemd.stop_unit(self.cfg.unit)

    async def _on_unit(self, signal: UnitSignal) -> None:
        match signal:
            case MainExited(code, status):
                self._exit_cause = startcheck.exit_cause(code, status)
            case JobDone(result, job):
                if self.state is not State.STARTING or job != self._start_job:
                    return  # e.g. the previous instance's stop job
                if result == "done":
                    self._seen_running = True
                elif result != "canceled":
                    await self._fail(f"systemd's start job for {self.cfg.unit} ended with {result!r}")
            case ActiveStateChanged(active_state) if active_state not in ("inactive", "failed"):
                await self._on_active_state(active_state)
            case ActiveStateChanged(active_state):
                # a signal may be stale: the unit's state now is what counts
                if now := await self._unit_now(active_state):
                    await self._on_active_state(now)
            case UnitRemoved():
                # maybe a reload's (UnitRemoved for every unit)
                if now := await self._unit_now(GONE):
                    await self._on_active_state(now)
            case ManagerBack():
                if now := await self._unit_now(None):
                    await self._on_active_state(now)
            case _:
                assert_never(signal)

    async def _on_active_state(self, active_state: str) -> None:
        """Follow the unit's ActiveState (GONE when it is not loaded)."""
        st = self.state
        if active_state in ("active", "activating", "reloading"):
            self._seen_running = True
            if st is State.STOPPED:  # started by somebody else, e.g. `systemctl start`
                await self._adopt(await self.systemd.unit_state(self.cfg.unit))
            return
        if active_state == "deactivating":
            if st in (State.STARTING, State.GOING_TO_SLEEP, State.WAKING):
                self._cancel_attempt()
            if st is not State.STOPPING:
                # stopped by somebody else (systemctl, the idle check without
                # a shim): vLLM exits only once our connections are closed
                self.upstream.cut(stopping.cut_message(self.cfg.name, "external"), retry=True)
            if st is not State.FAILED:
                self._set(Event.UNIT_DEACTIVATING)
            return
        # inactive, failed, or GONE
        if st is State.STARTING and not self._seen_running and active_state != "failed":
            return  # the new unit's initial state, before its start job ran
        if st is State.STARTING:
            what = "exited" if active_state != GONE else "disappeared"
            await self._fail(f"its process {what} before it was ready (unit {active_state})")
            return
        if st in (State.GOING_TO_SLEEP, State.WAKING):
            self._cancel_attempt()
        if st in (State.READY, State.GOING_TO_SLEEP, State.SLEEPING, State.WAKING):
            log.warning("engine %s stopped unexpectedly (unit %s)", self.cfg.name, active_state)
        if st is not State.STOPPED:
            if st is not State.FAILED:
                self._on_event(events.Stop(self._stop_cause or "external"))
            self._stop_cause = ""
            self._cut_message = ""
            self._set(Event.UNIT_GONE)
        self.upstream.reset()
        self.main_pid = 0
        restart, self._restart_now = self._restart_now, False
        if self.state is State.STOPPED and (self._wanted or restart):
            await self._start()

    async def _unit_now(self, signalled: str | None) -> str:
        """The unit's ActiveState now, after a signal that says it stopped
        (`signalled`: inactive, failed or GONE), or when there is nothing
        to go by (None: systemd came back on the bus, or a stop of an engine
        the gateway has stopped); "" when there is nothing to do."""
        unit = await self.systemd.unit_state(self.cfg.unit)
        now = unit.active_state
        st = self.state
        if unit.running:
            if st is State.STOPPING:
                # it stopped and somebody started it again since: follow it
                self._set(Event.UNIT_GONE)
                await self._adopt(unit)
            elif st in (State.STOPPED, State.FAILED):
                log.warning("engine %s: the gateway had it %s, but %s is %s: the unit's state wins; "
                            "adopting it", self.cfg.name, st.value, self.cfg.unit, now)
                await self._adopt(unit)
            elif signalled == GONE:
                log.info("engine %s: %s said %r, but it is %s (a daemon-reload?): keeping it",
                         self.cfg.name, self.cfg.unit, signalled, now)
            return ""
        if signalled is not None:
            return signalled
        return "" if st is State.STOPPED and now in (GONE, "inactive", "failed") else now

    def _set(self, event: Event) -> None:
        new = next_state(self.state, event)
        if new is not self.state:
            log.info("engine %s: %s -> %s (%s)", self.cfg.name, self.state.value, new.value, event.value)
            now = time.time()
            self.state_seconds[self.state] = self.state_seconds.get(self.state, 0.0) + now - self.state_since
            self.state = new
            self.state_since = now
            if new is State.READY:
                self._awake_since = trio.current_time()
            self._settle_reservation()
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        self._on_change()


class _StepFailed(Exception):
    """A call in the sleep or wake sequence failed; the message says which."""
