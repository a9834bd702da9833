"""shim.meter: what an engine holds, measured by its unit's slice (fake GPUs) or
NVML's per-process usage, and the measuring task's records."""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from shim.config import EngineConfig
from shim.engine import Engine
from shim.gpu import NvmlProbe
from shim.lifecycle import State
from shim.measured import MeasuredStore
from shim.meter import SETTLE_S, Measurements, NvmlMeter, SliceMeter, changed, describe, slice_device
from shim.systemd import Systemd

MiB = 1024**2
CFG = EngineConfig(name="a", command=("vllm", "serve", "m"), unit="vllm-a.service", sleep_level=1,
                   memory=300 * MiB)


def test_the_fake_gpu_of_a_cgroup_is_its_slice() -> None:
    slices = ["g0.slice", "g1.slice"]
    assert slice_device("/g1.slice/vllm-a.service", slices) == 1
    assert slice_device("/user.slice/user-1000.slice/user@1000.service/g0.slice/x.service", slices) == 0
    assert slice_device("/app.slice/x.service", slices) is None
    assert slice_device("/xg1.slice/x.service", slices) is None


def test_a_reading_is_news_on_another_gpu_or_past_five_percent() -> None:
    assert changed({}, {0: 100})
    assert changed({0: 100}, {1: 100})
    assert not changed({0: 100}, {0: 104})
    assert changed({0: 100}, {0: 106}) and changed({0: 100}, {0: 94})
    assert describe({1: 2 * 1024 * MiB, 0: 512 * MiB}) == "512 MiB on GPU 0, 2 GiB on GPU 1"
    assert describe({}) == "nothing"


class FakeSystemd:
    def __init__(self, cgroup: str, memory: int | None) -> None:
        self.cgroup, self.memory = cgroup, memory

    async def control_group(self, unit: str) -> str:
        return self.cgroup

    async def memory_current(self, unit: str) -> int | None:
        return self.memory


async def test_slice_meter_puts_the_unit_memory_on_its_fake_gpu() -> None:
    sd = FakeSystemd("/g1.slice/vllm-a.service", 150 * MiB)
    meter = SliceMeter(cast(Systemd, sd), ["g0.slice", "g1.slice"])
    assert await meter.held("vllm-a.service", (1,)) == {1: 150 * MiB}
    sd.cgroup = ""  # not running
    assert await meter.held("vllm-a.service", (1,)) is None
    sd.cgroup = "/elsewhere.slice/vllm-a.service"
    assert await meter.held("vllm-a.service", (1,)) is None


class FakeNvml:
    """Stands in for NvmlProbe.processes: pid -> bytes, or None."""

    def __init__(self, usage: dict[int, int] | None) -> None:
        self.usage = usage

    async def processes(self) -> dict[int, int] | None:
        return self.usage


async def test_nvml_meter_adds_up_the_processes_of_the_unit_cgroup_per_gpu(tmp_path: Path) -> None:
    unit = tmp_path / "g.slice" / "vllm-a.service"
    (unit / "worker").mkdir(parents=True)
    (unit / "cgroup.procs").write_text("100\n")
    (unit / "worker" / "cgroup.procs").write_text("101\n102\n")
    probes = {0: FakeNvml({100: 1 * MiB, 101: 10 * MiB, 555: 99 * MiB}), 1: FakeNvml({102: 20 * MiB}),
              2: FakeNvml(None)}
    sd = FakeSystemd("/g.slice/vllm-a.service", None)
    meter = NvmlMeter(cast(Systemd, sd), cast(dict[int, NvmlProbe], probes), roots=[tmp_path])
    assert await meter.held("vllm-a.service", (0, 1, 2)) == {0: 11 * MiB, 1: 20 * MiB}
    assert await meter.held("vllm-a.service", (2,)) is None  # NVML cannot tell
    probes[2].usage = {555: MiB}  # none of the unit's processes: another pid namespace
    assert await meter.held("vllm-a.service", (2,)) is None
    sd.cgroup = "/g.slice/gone.service"
    assert await meter.held("vllm-a.service", (0,)) is None


def test_records_are_kept_by_command_and_logged_when_news(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = MeasuredStore(tmp_path / "m.json")
    m = Measurements(None, store)
    assert m.need(CFG) is None and m.asleep_holds(CFG) is None
    with caplog.at_level(logging.INFO, "vllm_gateway.meter"):
        assert m.record(CFG, True, {0: 200 * MiB})
        assert not m.record(CFG, True, {0: 201 * MiB})  # within 5 %: not news
        assert m.record(CFG, False, {0: 50 * MiB})
    assert "engine a holds 200 MiB on GPU 0 awake (measured; its `memory` says 300 MiB)" in caplog.text
    assert "engine a holds 50 MiB on GPU 0 asleep (level 1) (measured)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, "vllm_gateway.meter"):
        assert not m.record(CFG, False, {0: 50 * MiB})
        assert caplog.text == ""  # neither news nor the first reading since a change
        assert not m.record(CFG, False, {0: 50 * MiB}, first=True)
    assert "engine a holds 50 MiB on GPU 0 asleep (level 1) (measured)" in caplog.text
    assert m.need(CFG) == int(200 * MiB * 1.1) and m.asleep_holds(CFG) == 50 * MiB
    # another sleep level has figures of its own
    assert Measurements(None, store).asleep_holds(EngineConfig(**{**CFG.__dict__, "sleep_level": 2})) is None
    kept = MeasuredStore(tmp_path / "m.json").load().get(CFG.command)
    assert kept.awake == {0: 200 * MiB} and kept.asleep == {1: {0: 50 * MiB}}
    assert m.as_json(CFG)["now"] == {"0": 50 * MiB}


class FakeEngine:
    def __init__(self) -> None:
        self.cfg = CFG
        self.state = State.READY
        self._changed = trio.Event()

    def set(self, state: State) -> None:
        self.state = state
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self, timeout_s: float) -> None:
        changed = self._changed
        with trio.move_on_after(timeout_s):
            await changed.wait()


class Readings:
    def __init__(self) -> None:
        self.value: dict[int, int] = {0: 100 * MiB}
        self.asked = 0

    async def held(self, unit: str, devices: Any) -> dict[int, int] | None:
        self.asked += 1
        return dict(self.value)


async def test_the_task_measures_ready_and_asleep_engines_and_forgets_stopped_ones(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    readings = Readings()
    m = Measurements(readings, MeasuredStore(tmp_path / "m.json"))
    e = FakeEngine()
    bumps: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(m.watch, cast(Engine, e), lambda: bumps.append(1))
        await trio.sleep(SETTLE_S / 2)
        assert readings.asked == 0  # not before the memory settled
        await trio.sleep(SETTLE_S)
        assert m.now["a"] == {0: 100 * MiB} and m.need(CFG) == int(100 * MiB * 1.1) and bumps
        readings.value = {0: 30 * MiB}
        e.set(State.SLEEPING)
        await trio.sleep(SETTLE_S * 2)
        assert m.asleep_holds(CFG) == 30 * MiB and m.need(CFG) == int(100 * MiB * 1.1)
        e.set(State.STOPPED)
        await trio.sleep(0.1)
        assert "a" not in m.now
        nursery.cancel_scope.cancel()
    kept = MeasuredStore(tmp_path / "m.json").load().get(CFG.command)
    assert (kept.awake, kept.asleep) == ({0: 100 * MiB}, {1: {0: 30 * MiB}})


async def test_without_a_meter_nothing_is_measured(tmp_path: Path) -> None:
    m = Measurements(None, MeasuredStore(tmp_path / "m.json"))
    await m.watch(cast(Engine, FakeEngine()), lambda: None)


def test_a_fake_nvml_module_gives_per_process_figures() -> None:
    from shim.gpu import held_by, process_usage
    procs = [types.SimpleNamespace(pid=7, usedGpuMemory=5), types.SimpleNamespace(pid=7, usedGpuMemory=2),
             types.SimpleNamespace(pid=8, usedGpuMemory=None)]
    assert process_usage(procs) == {7: 7}
    assert held_by({7: 7, 9: 1}, [7, 7, 8]) == 7
