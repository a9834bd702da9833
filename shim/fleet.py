"""Several engines on one GPU: which may hold memory, and who waits.

Each engine keeps its own owner task (shim/engine.py). The fleet only
decides admissions, and writes nothing of an engine's state: it plans with
what each engine reports (`Engine.report`) and asks engines to change
(`admit`, `drain`, `undrain`, `request_stop`). A request for an engine that
holds no GPU memory waits at the fleet's gate, in one first-come queue
across engines. The fleet's own task takes the oldest waiting request, asks
`placement.plan` whether its engine fits, makes room (least recently used
engines drain: they sleep or stop after their requests in flight finish),
then admits that engine with every request waiting for it at once: requests
for one model are served together, so mixed load swaps in batches instead
of at every request.

It also holds the GPU for other programs (`vllm-gateway yield`), and checks
after each stop or sleep that the engine's memory came back.

With several GPUs, each has its own probe and figures, an engine needs room
on each of its GPUs (placement.py), and a hold of some GPUs takes only the
engines that run on them. What each engine really holds, awake and asleep,
is measured (meter.py) and replaces its configured `memory` in the plans.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import trio

from .config import GatewayConfig
from .engine import Engine
from .errors import GpuBusy, GpuYielded
from .gpu import GpuMemory, GpuProbe, format_bytes, probes_for
from .lifecycle import AWAKE, State
from .measured import MeasuredStore
from .meter import Measurements
from .placement import Device, EngineView, Evict, Fits, Refuse, Wait, plan
from .systemd import Systemd
from .yielding import affects, read_hold_details, read_holds

log = logging.getLogger("vllm_gateway.fleet")

# After its last request, an engine counts as in use this long (clients
# send their next request at once): min_residency protects it meanwhile.
IN_USE_GRACE_S = 1.0
# How long to watch the free memory rise after an engine stopped or slept.
MEMORY_BACK_S = 15.0
MEMORY_POLL_S = 0.25
YIELD_RETRY_AFTER_S = 30.0
# The end of the description of every engine unit the gateway starts.
ORPHAN_MARK = "started by vllm-gateway"


def probe_for(cfg: GatewayConfig, systemd: Systemd) -> dict[int, GpuProbe]:
    """A probe per GPU: the fake GPUs when configured, else NVML for every GPU
    an engine runs on, where nvidia-ml-py is installed."""
    return probes_for([(f.slice, f.memory) for f in cfg.fake_gpus],
                      {d for e in cfg.engines.values() for d in e.devices}, systemd,
                      importlib.util.find_spec("pynvml") is not None)


async def stop_orphans(systemd: Systemd, cfg: GatewayConfig) -> list[str]:
    """Stop engines this gateway started under an earlier configuration that
    no longer lists them: nothing else would ever stop them, and they hold
    GPU memory."""
    ours = {e.unit for e in cfg.engines.values()}
    orphans = [
        name for name, description, active in await systemd.list_units("vllm*.service")
        if name not in ours and description.endswith(ORPHAN_MARK) and active in ("active", "activating")
    ]
    for name in orphans:
        log.warning("stopping %s: vllm-gateway started it, and the configuration no longer lists it", name)
        await systemd.stop_unit(name)
    return orphans


@dataclass
class _Ticket:
    engine: Engine
    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None


@dataclass
class MemoryCheck:
    """What came back after an engine stopped or slept."""

    engine: str
    expected: int | None
    returned: int | None
    free: int | None
    ok: bool
    at: float

    def as_json(self) -> dict[str, object]:
        return {"expected_bytes": self.expected, "returned_bytes": self.returned,
                "free_bytes": self.free, "ok": self.ok, "at": round(self.at, 3)}


class Fleet:
    def __init__(
        self, cfg: GatewayConfig, engines: Mapping[str, Engine],
        probe: GpuProbe | Mapping[int, GpuProbe] | None, measurements: Measurements | None = None,
    ) -> None:
        self.cfg = cfg
        self.engines = dict(engines)
        # one probe per GPU index; a single probe is GPU 0's
        self.probes: dict[int, GpuProbe] = (
            {} if probe is None else dict(probe) if isinstance(probe, Mapping) else {0: probe})
        self.probe = self.probes.get(0)
        self.measured = measurements or Measurements(None, MeasuredStore())
        self.gpus: dict[int, GpuMemory | None] = {}  # the last reading of each GPU
        self._totals: dict[int, int | None] = {}
        self._by_model = {m: e for e in self.engines.values() for m in e.cfg.models}
        self._queue: list[_Ticket] = []
        self._changed = trio.Event()
        self.holds: dict[str, float] = read_holds()
        self.hold_gpus: dict[str, tuple[int, ...] | None] = {}  # holder -> GPUs (None: all)
        self._read_hold_gpus()
        self.last_decision = ""
        self.swaps = 0  # engines admitted after others made room for them
        self._making_room_for: Engine | None = None
        self.memory_checks: dict[str, MemoryCheck] = {}
        self.gpu: GpuMemory | None = None  # the last reading
        self._total: int | None = cfg.gpu_memory
        for e in self.engines.values():
            e.join_fleet(self.gate, self.bump)

    @property
    def total(self) -> int | None:
        """The GPU memory to plan with, once known."""
        return self._total

    # ---- asked by request handlers ----

    def engine_for(self, model: str) -> Engine | None:
        return self._by_model.get(model)

    @property
    def first(self) -> Engine:
        return next(iter(self.engines.values()))

    def bump(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def engine_changed(self) -> None:
        """An engine's state or load changed: look again if anything waits on it."""
        if self._queue or self.holds or any(e.draining or e.reserved for e in self.engines.values()):
            self.bump()

    async def gate(self, engine: Engine) -> None:
        """Wait until `engine` may hold GPU memory; raise when it cannot."""
        if self._holders(engine):
            raise self._yielded(engine)
        ticket = _Ticket(engine)
        self._queue.append(ticket)
        self.bump()
        try:
            await ticket.done.wait()
        finally:
            if ticket in self._queue:
                self._queue.remove(ticket)
                self.bump()
        if ticket.error is not None:
            raise ticket.error

    def _yielded(self, engine: Engine | None = None) -> GpuYielded:
        holders = self.holds if engine is None else self._holders(engine)
        who = ", ".join(sorted(holders))
        gpus = {d for h in holders for d in self.hold_gpus.get(h) or ()}
        if engine is not None and all(self.hold_gpus.get(h) is not None for h in holders):
            gpus &= set(engine.cfg.devices)
            what = f"GPU {', '.join(map(str, sorted(gpus)))} of the engine {engine.cfg.name!r} is"
        else:
            what = "the GPU is"
        return GpuYielded(
            f"vllm-gateway: {what} yielded to other work ({who}); engines start again after "
            f"`vllm-gateway release`", retry_after_s=YIELD_RETRY_AFTER_S,
        )

    def _read_hold_gpus(self) -> None:
        details = read_hold_details()
        self.hold_gpus = {h: details[h].gpus if h in details else self.hold_gpus.get(h) for h in self.holds}

    def _holders(self, e: Engine) -> list[str]:
        """Who holds a GPU that `e` runs on."""
        return [h for h in self.holds if affects(self.hold_gpus.get(h), e.cfg.devices)]

    # ---- yield ----

    async def hold(self, holder: str, timeout_s: float, gpus: tuple[int, ...] | None = None) -> bool:
        """Take the GPU (or only `gpus`) for `holder`: every engine there sleeps
        or stops, and none starts until it is released. True once no engine
        holds memory there."""
        self.holds = read_holds()
        self.holds.setdefault(holder, time.time())
        self._read_hold_gpus()
        self.hold_gpus[holder] = gpus
        taken = [e for e in self.engines.values() if affects(gpus, e.cfg.devices)]
        log.info("yielding %s to %s", "the GPU" if gpus is None else f"GPU {','.join(map(str, gpus))}",
                 holder)
        self.bump()
        with trio.move_on_after(timeout_s):
            while any(e.holds_memory for e in taken):
                await self._wait_engines_changed(1.0)
            return True
        for e in taken:
            if e.holds_memory:
                log.warning("engine %s still holds the GPU after %g s: stopping it", e.cfg.name, timeout_s)
                e.request_stop("yield", detail=", ".join(sorted(self._holders(e))))
        last_s = max((e.cfg.stop_grace_s + e.cfg.stop_timeout_s for e in taken), default=0)
        with trio.move_on_after(last_s + 5):
            while any(e.holds_memory for e in taken):
                await self._wait_engines_changed(1.0)
            return True
        return False

    def release(self, holder: str | None) -> None:
        self.holds = read_holds()
        if holder is None:
            self.holds.clear()
        else:
            self.holds.pop(holder, None)
        self._read_hold_gpus()
        log.info("GPU released by %s; held now by: %s", holder or "everyone",
                 ", ".join(self.holds) or "nobody")
        self.bump()

    async def _wait_engines_changed(self, timeout_s: float) -> None:
        changed = self._changed
        with trio.move_on_after(timeout_s):
            await changed.wait()

    # ---- the owner task ----

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for e in self.engines.values():
                nursery.start_soon(self._watch_memory, e)
                nursery.start_soon(self.measured.watch, e, self.bump)
            while True:
                changed = self._changed
                until = await self._step()
                with trio.move_on_at(until):
                    await changed.wait()

    async def _step(self) -> float:
        """One pass; returns the trio time by which to look again at the latest."""
        if self.holds:
            await self._yield_step()
            if all(self._holders(e) for e in self.engines.values()):
                return math.inf
        self._release_admitted()
        if not self._queue:
            await self._undrain(keep=())
            return math.inf
        target = self._queue[0].engine
        devices = await self._devices(target)
        decision = plan(
            self._view(target), [self._view(e) for e in self.engines.values() if e is not target],
            devices=devices, now=trio.current_time(), min_residency_s=self.cfg.min_residency_s,
        )
        match decision:
            case Fits():
                await self._undrain(keep=())
                swapped = self._making_room_for is target
                if swapped:
                    self.swaps += 1
                    log.info("swapping in engine %s (swap %d)", target.cfg.name, self.swaps)
                self._making_room_for = None
                await target.admit(swapped=swapped)
                self._release_admitted()
                return trio.current_time()  # look at the next in line
            case Evict(victims, reason):
                self._note(f"evicting {', '.join(name for name, _ in victims)} {reason}")
                await self._undrain(keep=[name for name, _ in victims])
                self._making_room_for = target
                for name, action in victims:
                    await self._evict(self.engines[name], action, "evicted",
                                      f"the engine {target.cfg.name!r}")
                return math.inf
            case Wait(until, reason):
                self._note(f"{target.cfg.name} waits: {reason}")
                await self._undrain(keep=())
                return until
            case Refuse(message):
                log.warning("%s", message)
                self._fail(target, GpuBusy(message, retry_after_s=10.0))
                return trio.current_time()
        return math.inf

    def _note(self, decision: str) -> None:
        if decision != self.last_decision:
            log.info("%s", decision)
            self.last_decision = decision

    def _release_admitted(self) -> None:
        for t in list(self._queue):
            e = t.engine
            if not e.draining and e.holds_memory:
                self._queue.remove(t)
                t.done.set()

    def _fail(self, engine: Engine, error: Exception) -> None:
        for t in list(self._queue):
            if t.engine is engine:
                self._queue.remove(t)
                t.error = error
                t.done.set()

    async def _undrain(self, keep: Collection[str]) -> None:
        for e in self.engines.values():
            if e.draining and e.cfg.name not in keep and not self._holders(e):
                await e.undrain()

    async def _evict(self, e: Engine, action: str, cause: str, detail: str) -> None:
        # its requests finish first (within its stop_grace, then they are
        # cut), and the bump once they did brings us back here
        await e.drain(action, cause, detail)

    async def _yield_step(self) -> None:
        for t in list(self._queue):
            if self._holders(t.engine):
                self._queue.remove(t)
                t.error = self._yielded(t.engine)
                t.done.set()
        for e in self.engines.values():
            if e.state in AWAKE and (holders := self._holders(e)):
                await self._evict(e, "sleep", "yield", ", ".join(sorted(holders)))

    def _view(self, e: Engine) -> EngineView:
        """What placement sees of `e`: what its owner reports now, and its figures."""
        now = trio.current_time()
        r = e.report()
        return EngineView(
            name=e.cfg.name,
            need=self.need(e),
            pinned=e.cfg.pinned,
            awake=r.holds_memory,
            loading=r.reserved or r.state in (State.STARTING, State.WAKING),
            asleep=r.state is State.SLEEPING,
            in_use=r.active > 0 or r.wanted > 0 or now - r.last_used < IN_USE_GRACE_S,
            awake_since=r.awake_since,
            last_used=r.last_used,
            can_sleep=r.sleep_enabled,
            gpus=e.cfg.devices,
            asleep_holds=self.measured.asleep_holds(e.cfg) if r.sleep_enabled else None,
        )

    def need(self, e: Engine) -> int | None:
        """What `e` needs on each of its GPUs: as measured once known, else its
        `memory` (or vLLM's share of its smallest GPU)."""
        measured = self.measured.need(e.cfg)
        if measured is not None:
            return measured
        totals = [self._totals.get(d) for d in e.cfg.devices]
        known = [t for t in totals if t is not None]
        return e.cfg.memory_needed(min(known) if len(known) == len(totals) else self._total)

    async def _devices(self, target: Engine) -> dict[int, Device]:
        """The figures of every GPU that the target or an engine beside it uses."""
        used = {d for e in self.engines.values() for d in e.cfg.devices}
        out = {}
        for d in sorted(used | set(target.cfg.devices)):
            total = await self._gpu_total_of(d)
            reading = await self._read(d)
            out[d] = Device(total, reading.free if reading else None)
        return out

    def gpu_total(self, index: int) -> int | None:
        """GPU `index`'s memory to plan with, once known."""
        return self._totals.get(index)

    async def _gpu_total_of(self, index: int) -> int | None:
        if self.cfg.gpu_memory is not None:
            self._totals[index] = self.cfg.gpu_memory
        elif self._totals.get(index) is None and index in self.probes:
            reading = await self.probes[index].memory()
            self._totals[index] = reading.total if reading else None
        total = self._totals.get(index)
        if index == 0:
            self._total = total
        return total

    async def _read(self, index: int) -> GpuMemory | None:
        probe = self.probes.get(index)
        reading = None if probe is None else await probe.memory()
        self.gpus[index] = reading
        if index == 0:
            self.gpu = reading
        return reading

    # ---- memory back after a stop or a sleep ----

    async def _watch_memory(self, e: Engine) -> None:
        probe = self.probes.get(e.cfg.devices[0])
        if probe is None:
            return
        before: GpuMemory | None = None
        was = e.state
        while True:
            await e.wait_changed(math.inf)
            now = e.state
            if now in (State.STOPPING, State.GOING_TO_SLEEP) and was not in (State.STOPPING,):
                before = await probe.memory()
            elif now in (State.STOPPED, State.SLEEPING, State.FAILED) and was in AWAKE:
                await self._check_back(e, probe, before, "stopped" if now is not State.SLEEPING else "asleep")
                before = None
            was = e.state
            self.bump()

    async def _check_back(self, e: Engine, probe: GpuProbe, before: GpuMemory | None, what: str) -> None:
        need = self.need(e)
        kept = (self.measured.asleep_holds(e.cfg) or 0) if what == "asleep" else 0
        expected = None if need is None else (need - kept) // 2
        reading = before
        with trio.move_on_after(MEMORY_BACK_S):
            while True:
                reading = await probe.memory()
                if reading is None or before is None or expected is None:
                    break
                if reading.free - before.free >= expected:
                    break
                await trio.sleep(MEMORY_POLL_S)
        returned = None if reading is None or before is None else reading.free - before.free
        ok = expected is None or returned is None or returned >= expected
        check = MemoryCheck(e.cfg.name, need, returned, reading.free if reading else None, ok, time.time())
        self.memory_checks[e.cfg.name] = check
        free = "unknown" if reading is None else format_bytes(reading.free)
        if ok:
            back = "" if returned is None else f"{format_bytes(returned)} came back; "
            log.info("engine %s %s: %sGPU memory free: %s", e.cfg.name, what, back, free)
        else:
            log.warning(
                "engine %s %s but its GPU memory did not come back within %g s: %s returned, "
                "about %s expected (free: %s); another process may still hold it",
                e.cfg.name, what, MEMORY_BACK_S, format_bytes(returned or 0),
                format_bytes(need or 0), free,
            )
