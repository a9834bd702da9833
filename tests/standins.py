"""In-memory stand-ins for what an engine talks to: systemd's user manager
(the methods of shim.systemd.Systemd that engines and the fleet call) and
the engine's own HTTP endpoints (health, sleep, wake).

They follow the real ones where it matters to the engine's owner task: a
transient unit starts with "activating", a finished start job and "active";
a stop says "deactivating", "inactive" and then that the unit was removed
(engines are collected once inactive). Time is trio's, so tests run on
`autojump_clock` and take milliseconds.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio

from shim import engine as engine_module
from shim import journal, portcheck
from shim.systemd import (
    GONE,
    ActiveStateChanged,
    JobDone,
    MainExited,
    SystemdError,
    TransientService,
    UnitRemoved,
    UnitSignal,
    UnitState,
)


class FakeSystemd:
    """A user manager in memory. Units start at once; `hold_starts` keeps
    their start jobs pending until `finish_start` (nothing runs meanwhile)."""

    def __init__(self) -> None:
        self.units: dict[str, UnitState] = {}
        self.started: list[TransientService] = []
        self.stopped: list[str] = []
        self.refuse_starts = ""  # a D-Bus error name that StartTransientUnit answers
        self._watchers: dict[str, list[trio.MemorySendChannel[UnitSignal]]] = {}
        self._jobs = itertools.count(1)
        self._pids = itertools.count(1000)

    # ---- the methods of shim.systemd.Systemd ----

    @asynccontextmanager
    async def watch(self, unit: str) -> AsyncIterator[trio.MemoryReceiveChannel[UnitSignal]]:
        send, recv = trio.open_memory_channel[UnitSignal](math.inf)
        self._watchers.setdefault(unit, []).append(send)
        try:
            yield recv
        finally:
            self._watchers[unit].remove(send)

    async def unit_state(self, unit: str) -> UnitState:
        await trio.lowlevel.checkpoint()
        return self.units.get(unit, UnitState(GONE))

    async def start_transient(self, svc: TransientService) -> str:
        await trio.lowlevel.checkpoint()
        if self.refuse_starts:
            raise SystemdError(f"StartTransientUnit {svc.name}", self.refuse_starts, "refused")
        if svc.name in self.units:
            raise SystemdError(f"StartTransientUnit {svc.name}", "org.freedesktop.systemd1.UnitExists",
                               f"Unit {svc.name} already exists.")
        self.started.append(svc)
        job = f"/org/freedesktop/systemd1/job/{next(self._jobs)}"
        self._set(svc.name, UnitState("activating", main_pid=next(self._pids)))
        self._set(svc.name, UnitState("active", "running", main_pid=self.units[svc.name].main_pid))
        self._emit(svc.name, JobDone("done", job))
        return job

    async def stop_unit(self, unit: str) -> None:
        await trio.lowlevel.checkpoint()
        self.stopped.append(unit)
        if unit in self.units:
            self._set(unit, UnitState("deactivating"))
            self._remove(unit, "inactive")

    async def reset_failed(self, unit: str) -> None:
        await trio.lowlevel.checkpoint()
        if unit in self.units and self.units[unit].active_state == "failed":
            self._remove(unit, None)

    async def control_group(self, unit: str) -> str:
        await trio.lowlevel.checkpoint()
        return f"/{unit}" if unit in self.units else ""

    async def memory_current(self, unit: str) -> int | None:
        await trio.lowlevel.checkpoint()
        return None

    async def list_units(self, *patterns: str) -> list[tuple[str, str, str]]:
        await trio.lowlevel.checkpoint()
        return [(name, "", u.active_state) for name, u in self.units.items()]

    # ---- what tests do to units ----

    def crash(self, unit: str, status: int = 1) -> None:
        """The unit's main process exits on its own (a crash, an OOM kill)."""
        self._emit(unit, MainExited(1, status))
        self._remove(unit, "failed")

    def stop_outside(self, unit: str) -> None:
        """`systemctl --user stop UNIT`, by somebody else."""
        self._set(unit, UnitState("deactivating"))
        self._remove(unit, "inactive")

    def running(self, unit: str) -> bool:
        return unit in self.units and self.units[unit].running

    # ---- inside ----

    def _set(self, unit: str, state: UnitState) -> None:
        self.units[unit] = state
        self._emit(unit, ActiveStateChanged(state.active_state))

    def _remove(self, unit: str, last: str | None) -> None:
        self.units.pop(unit, None)
        if last is not None:
            self._emit(unit, ActiveStateChanged(last))
        self._emit(unit, UnitRemoved())

    def _emit(self, unit: str, signal: UnitSignal) -> None:
        for send in self._watchers.get(unit, []):
            send.send_nowait(signal)


@dataclass
class FakeVllm:
    """The HTTP side of the engines: healthy `start_s` after their unit
    started, with vLLM's sleep endpoints. Keyed by port."""

    systemd: FakeSystemd
    start_s: float = 1.0
    sleep_s: float = 0.1
    wake_s: float = 0.1
    can_sleep: bool = True
    fail_wake: bool = False
    calls: list[tuple[int, str, str]] = field(default_factory=list)
    asleep: set[int] = field(default_factory=set)
    _ready_at: dict[int, float] = field(default_factory=dict)

    def _unit_for(self, port: int) -> str | None:
        for svc in reversed(self.systemd.started):
            if f"--port={port}" in svc.argv or str(port) in svc.argv:
                return svc.name
        return None

    def _up(self, port: int) -> bool:
        unit = self._unit_for(port)
        if unit is None or not self.systemd.running(unit):
            self._ready_at.pop(port, None)
            self.asleep.discard(port)
            return False
        ready_at = self._ready_at.setdefault(port, trio.current_time() + self.start_s)
        return trio.current_time() >= ready_at

    async def call(self, host: str, port: int, method: str, path: str, body: bytes | None = None,
                   timeout_s: float = 5.0, unix_path: str | None = None) -> tuple[int, bytes] | None:
        await trio.lowlevel.checkpoint()
        if not self._up(port):
            return None
        self.calls.append((port, method, path))
        if path == "/health":
            return 200, b""
        if path == "/is_sleeping":
            return 200, b'{"is_sleeping": %s}' % (b"true" if port in self.asleep else b"false")
        if path.startswith("/sleep"):
            if not self.can_sleep:
                return 404, b'{"detail": "Not Found"}'
            await trio.sleep(self.sleep_s)
            self.asleep.add(port)
            return 200, b""
        if path.startswith("/wake_up"):
            await trio.sleep(self.wake_s)
            if self.fail_wake:
                return 500, b"wake failed"
            self.asleep.discard(port)
            return 200, b""
        return 404, b""

    async def probe(self, host: str, port: int, path: str) -> int | None:
        result = await self.call(host, port, "GET", path)
        return None if result is None else result[0]


@pytest.fixture
def standins(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeSystemd, FakeVllm]:
    """The stand-ins, with the engine module's HTTP calls, port check and
    journal reads pointed at them."""
    sd = FakeSystemd()
    vllm = FakeVllm(sd)
    monkeypatch.setattr(engine_module, "call", vllm.call)
    monkeypatch.setattr(engine_module, "probe", vllm.probe)

    async def nobody_else(systemd: object, unit: str, port: int) -> str | None:
        await trio.lowlevel.checkpoint()
        return None

    async def no_lines(unit: str, since_epoch_s: float, lines: int = 0) -> list[str]:
        await trio.lowlevel.checkpoint()
        return ["ERROR engine: CUDA out of memory (stand-in)"]

    monkeypatch.setattr(portcheck, "port_taken", nobody_else)
    monkeypatch.setattr(journal, "tail", no_lines)
    monkeypatch.setattr(journal, "settled_tail", no_lines)
    return sd, vllm
