"""SliceProbe and slice placement against a real systemd user manager.

Fake engines (fake-vllm --hold-rss-mb) run as transient units in one slice;
the fake GPU's free memory must follow them as they start and stop.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
from jeepney.io.trio import open_dbus_router

from shim.gpu import GpuMemory, SliceProbe
from shim.systemd import Systemd, TransientService
from tests.fakevllm_util import FAKE_VLLM, free_port
from tests.sandboxing import REPO, Sandbox

pytestmark = pytest.mark.sandbox

MiB = 1024**2
BUDGET = 8 * 1024 * MiB
HOLD_MB = 200
# What one engine must take from the budget: its ballast, less a margin for
# how the kernel counts (the python process itself adds some 20 MiB on top).
ONE_ENGINE = (HOLD_MB - 10) * MiB
# What a stopped engine may leave charged to its slice (page cache of the
# files it read moves to the parent cgroup): well under its ballast.
LEFT_BEHIND = HOLD_MB // 2 * MiB
# Freed memory shows within about a second of the exit; this leaves room for
# the unit's stop and a loaded machine.
FREED_WITHIN_S = 30.0


@asynccontextmanager
async def systemd_in(sandbox: Sandbox) -> AsyncIterator[Systemd]:
    async with open_dbus_router(sandbox.bus_address) as router:
        yield Systemd(router)


def new_slice() -> str:
    # No dash: a dash would nest it ("a-b.slice" below "a.slice").
    return f"gwgpu{uuid.uuid4().hex[:8]}.slice"


def engine(slice: str, hold_mb: int = HOLD_MB) -> TransientService:
    name = f"gw-gpu-{uuid.uuid4().hex[:8]}.service"
    argv = [sys.executable, str(FAKE_VLLM), "--hold-rss-mb", str(hold_mb),
            "--host", "127.0.0.1", "--port", str(free_port())]
    return TransientService(name=name, argv=argv, environment={}, description="fake engine",
                            stop_timeout_s=5, syslog_identifier=name, slice=slice)


async def reading(probe: SliceProbe) -> GpuMemory:
    m = await probe.memory()
    assert m is not None, probe.describe()
    return m


async def until(predicate: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 60) -> float:
    """Poll until true; the seconds it took. The bound is only for a reading
    that never comes: a loaded machine took over 15 s to start an engine."""
    # systemd has no signal for memory: polling is the only way here.
    began = time.monotonic()
    with trio.move_on_after(timeout_s):
        while True:
            if await predicate():
                return time.monotonic() - began
            await trio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


async def test_a_transient_service_lands_in_its_slice(sandbox: Sandbox) -> None:
    slice = new_slice()
    svc = engine(slice, hold_mb=50)
    async with systemd_in(sandbox) as sd:
        await sd.start_transient(svc)
        try:
            async def active() -> bool:
                return (await sd.unit_state(svc.name)).active_state == "active"

            await until(active, "the unit to be active")
            assert await sd.control_group(svc.name) == f"/{slice}/{svc.name}"
            assert await sd.control_group(slice) == f"/{slice}"
            state = await sd.unit_state(svc.name)
            cgroup = sandbox.run(["cat", f"/proc/{state.main_pid}/cgroup"]).stdout
            assert f"name=systemd:/{slice}/{svc.name}" in cgroup

            async def holds() -> bool:
                return (await sd.memory_current(svc.name) or 0) >= 50 * MiB

            await until(holds, "the service's MemoryCurrent to show its ballast")
            assert (await sd.memory_current(slice) or 0) >= 50 * MiB
        finally:
            await sd.stop_unit(svc.name)
        assert await sd.memory_current("gw-gpu-never-started.service") is None
        assert await sd.control_group("gw-gpu-never-started.slice") == ""


async def test_slice_probe_follows_engines_starting_and_stopping(sandbox: Sandbox) -> None:
    slice = new_slice()
    first, second = engine(slice), engine(slice)
    async with systemd_in(sandbox) as sd:
        probe = SliceProbe(sd, slice, BUDGET)
        empty = await reading(probe)
        # Nothing started in it yet: the slice is not even loaded.
        assert empty == GpuMemory(BUDGET, BUDGET, f"fake GPU: RAM of {slice}")
        try:
            await sd.start_transient(first)

            async def first_held() -> bool:
                return (await reading(probe)).free <= BUDGET - ONE_ENGINE

            await until(first_held, "the first engine's ballast")
            one = await reading(probe)
            await sd.start_transient(second)

            async def second_held() -> bool:
                return (await reading(probe)).free <= one.free - ONE_ENGINE

            await until(second_held, "the second engine's ballast")
            two = await reading(probe)
            assert BUDGET - two.free < 2 * (HOLD_MB + 60) * MiB, two

            await sd.stop_unit(first.name)
            seen: dict[str, int] = {}

            async def freed() -> bool:
                # The slice holds the second engine's memory and little more:
                # the first's ballast is gone. Measured against the second's
                # own reading, not against `two`: on a loaded machine its
                # workers were still starting then, and it grew since.
                seen["slice"] = BUDGET - (await reading(probe)).free
                seen["second"] = await sd.memory_current(second.name) or 0
                return seen["slice"] <= seen["second"] + LEFT_BEHIND

            try:
                took = await until(freed, "the first engine's memory back", FREED_WITHIN_S)
            except AssertionError as e:
                raise AssertionError(f"{e}; last reading (bytes): {seen}, after both started: "
                                     f"{BUDGET - two.free}") from None
            print(f"freed memory showed {took:.2f} s after the stop request")
        finally:
            await sd.stop_unit(first.name)
            await sd.stop_unit(second.name)


async def test_rss_fallback_sees_the_same_engines_inside(sandbox: Sandbox) -> None:
    # SliceProbe's fallback reads the cgroup tree and /proc of the manager's
    # namespaces, so it runs inside the sandbox.
    slice = new_slice()
    engines = [engine(slice), engine(slice)]
    code = f"from shim.gpu import cgroup_rss; print(cgroup_rss('/{slice}'))"

    def rss() -> int:
        out = sandbox.run([sys.executable, "-c", code], env={"PYTHONPATH": str(REPO)}).stdout
        return int(out)

    async with systemd_in(sandbox) as sd:
        try:
            for svc in engines:
                await sd.start_transient(svc)

            async def both_held() -> bool:
                return rss() >= 2 * ONE_ENGINE

            await until(both_held, "both ballasts in the summed VmRSS")
            by_rss, by_systemd = rss(), await sd.memory_current(slice)
            assert by_systemd is not None
            # Both count the ballasts; VmRSS also counts shared library pages twice.
            assert abs(by_rss - by_systemd) < 100 * MiB, (by_rss, by_systemd)
            await sd.stop_unit(engines[0].name)

            async def freed() -> bool:
                return rss() < 2 * ONE_ENGINE - 50 * MiB

            await until(freed, "the stopped engine gone from the summed VmRSS", FREED_WITHIN_S)
        finally:
            for svc in engines:
                await sd.stop_unit(svc.name)
