"""Measure what each engine really holds on its GPUs, awake and asleep.

An `EngineMeter` answers, for an engine's unit, the bytes it holds on each
of its GPUs (None when it cannot tell now; it never raises):

- `NvmlMeter` lists the processes in the unit's cgroup tree (vLLM's API
  server and its workers) and adds up NVML's per-process usage
  (nvmlDeviceGetComputeRunningProcesses) for them, per GPU. NVML reports
  host pids: the shim and the driver must share a pid namespace (where
  they do not, no process matches, and the engine stays unmeasured).
- `SliceMeter`, for the fake GPUs, takes the unit's MemoryCurrent and puts it
  on the fake GPU whose slice the unit runs in.

`Measurements` is the one writer of the figures: one task per engine
measures it a moment after it became ready or fell asleep, and again every
`MEASURE_EVERY_S` while it stays so; the figures go to the journal when they
change, and to the store on disk (shim/measured.py). Placement then plans
with them instead of the configured `memory`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import trio

from .config import EngineConfig, GatewayConfig
from .engine import Engine
from .gpu import CGROUP_ROOTS, GpuProbe, NvmlProbe, cgroup_dir, cgroup_rss, format_bytes, held_by, tree_pids
from .lifecycle import State
from .measured import Measured, MeasuredStore
from .systemd import Systemd

log = logging.getLogger("vllm_gateway.meter")

# Freed memory shows within about a second of a sleep or a stop (gpu.py):
# measure this long after the state changed.
SETTLE_S = 1.0
# An engine's memory changes little while it keeps its state; each reading
# costs a D-Bus call or two and, with NVML, a driver call per GPU.
MEASURE_EVERY_S = 10.0
# A figure that moved less than this is not news for the journal or the file.
CHANGE_FRACTION = 0.05
# An engine measured awake may still grow a little (cuBLAS workspaces and the
# allocator's cache come with the first large batches): plans add this share.
GROWTH_MARGIN = 0.10


class EngineMeter(Protocol):
    async def held(self, unit: str, devices: Sequence[int]) -> dict[int, int] | None:
        """Bytes the unit holds on each of `devices` now; None when unknown (never raises)."""
        ...


def slice_device(control_group: str, slices: Sequence[str]) -> int | None:
    """The fake GPU whose slice holds a cgroup ("/g1.slice/vllm-a.service" -> 1)."""
    parts = control_group.strip("/").split("/")
    for index, name in enumerate(slices):
        if name in parts:
            return index
    return None


def changed(old: Mapping[int, int], new: Mapping[int, int]) -> bool:
    """Whether a new reading is news: another GPU, or a figure moved by CHANGE_FRACTION."""
    if old.keys() != new.keys():
        return True
    return any(abs(new[d] - old[d]) > CHANGE_FRACTION * max(old[d], 1) for d in new)


def describe(reading: Mapping[int, int]) -> str:
    return ", ".join(f"{format_bytes(n)} on GPU {d}" for d, n in sorted(reading.items())) or "nothing"


class SliceMeter:
    def __init__(self, systemd: Systemd, slices: Sequence[str]) -> None:
        self.systemd = systemd
        self.slices = list(slices)

    async def held(self, unit: str, devices: Sequence[int]) -> dict[int, int] | None:
        try:
            control_group = await self.systemd.control_group(unit)
            if not control_group:
                return None
            device = slice_device(control_group, self.slices)
            used = await self.systemd.memory_current(unit)
            if used is None:
                used = await trio.to_thread.run_sync(cgroup_rss, control_group)
        except Exception as e:  # the bus went away
            log.debug("no reading for %s: %s", unit, e)
            return None
        if device is None or used is None:
            return None
        return {device: used}


class NvmlMeter:
    def __init__(self, systemd: Systemd, probes: Mapping[int, NvmlProbe],
                 roots: Sequence[Path] = CGROUP_ROOTS) -> None:
        self.systemd = systemd
        self.probes = probes
        self.roots = roots

    async def held(self, unit: str, devices: Sequence[int]) -> dict[int, int] | None:
        try:
            control_group = await self.systemd.control_group(unit)
        except Exception as e:
            log.debug("no cgroup for %s: %s", unit, e)
            return None
        top = cgroup_dir(control_group, self.roots) if control_group else None
        if top is None:
            return None
        pids = await trio.to_thread.run_sync(tree_pids, top)
        out: dict[int, int] = {}
        for d in devices:
            probe = self.probes.get(d)
            usage = None if probe is None else await probe.processes()
            held = 0 if usage is None else held_by(usage, pids)
            # nothing at all is no reading: a running engine holds at least its
            # CUDA context, so NVML does not see its pids (another pid namespace)
            if held > 0:
                out[d] = held
        return out or None


class Measurements:
    """The measured figures of every engine; see the module docstring."""

    def __init__(self, meter: EngineMeter | None, store: MeasuredStore) -> None:
        self.meter = meter
        self.store = store
        self.now: dict[str, dict[int, int]] = {}  # engine -> latest reading, while ready or asleep

    def known(self, cfg: EngineConfig) -> Measured:
        return self.store.get(cfg.command)

    def need(self, cfg: EngineConfig) -> int | None:
        """What it holds awake on its busiest GPU, once measured, with GROWTH_MARGIN."""
        awake = self.known(cfg).awake
        return int(max(awake.values()) * (1 + GROWTH_MARGIN)) if awake else None

    def asleep_holds(self, cfg: EngineConfig) -> int | None:
        """What it keeps asleep (at its sleep level) on its busiest GPU, once measured."""
        asleep = self.known(cfg).asleep.get(cfg.sleep_level)
        return max(asleep.values()) if asleep else None

    def as_json(self, cfg: EngineConfig) -> dict[str, object]:
        return {**self.known(cfg).as_json(),
                "now": {str(d): n for d, n in sorted(self.now.get(cfg.name, {}).items())} or None}

    def record(self, cfg: EngineConfig, awake: bool, reading: Mapping[int, int], first: bool = False) -> bool:
        """Keep a reading; True when it is news (kept in the file). The journal
        gets news, and the `first` reading after each start, wake or sleep."""
        self.now[cfg.name] = dict(reading)
        known = self.known(cfg)
        old = known.awake if awake else known.asleep.get(cfg.sleep_level, {})
        news = changed(old, reading)
        if news:
            at = time.time()
            self.store.put(cfg.command, known.with_awake(reading, at) if awake
                           else known.with_asleep(cfg.sleep_level, reading, at))
        if news or first:
            what = "awake" if awake else f"asleep (level {cfg.sleep_level})"
            guess = ("" if not awake or cfg.memory is None
                     else f"; its `memory` says {format_bytes(cfg.memory)}")
            log.info("engine %s holds %s %s (measured%s)", cfg.name, describe(reading), what, guess)
        return news

    async def watch(self, e: Engine, on_change: Callable[[], None]) -> None:
        """Measure `e` while it is ready or asleep; forever."""
        if self.meter is None:
            return
        logged: State | None = None  # the state whose first reading went to the journal
        while True:
            state = e.state
            if state not in (State.READY, State.SLEEPING):
                self.now.pop(e.cfg.name, None)
                logged = None
                await e.wait_changed(math.inf)
                continue
            await e.wait_changed(SETTLE_S)
            if e.state is not state:
                continue
            reading = await self.meter.held(e.cfg.unit, e.cfg.devices)
            if reading is not None and e.state is state:
                self.record(e.cfg, state is State.READY, reading, first=logged is not state)
                logged = state
                on_change()
            await e.wait_changed(MEASURE_EVERY_S)


def measurements_for(cfg: GatewayConfig, systemd: Systemd, probes: Mapping[int, GpuProbe]) -> Measurements:
    """What measures the engines: the fake GPUs' slices, or NVML's per-process usage."""
    meter: EngineMeter | None = None
    if cfg.fake_gpus:
        meter = SliceMeter(systemd, [f.slice for f in cfg.fake_gpus])
    elif probes and all(isinstance(p, NvmlProbe) for p in probes.values()):
        meter = NvmlMeter(systemd, {d: p for d, p in probes.items() if isinstance(p, NvmlProbe)})
    return Measurements(meter, MeasuredStore().load())
