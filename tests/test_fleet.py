"""Several engines on one GPU, the fleet's decisions against in-memory
stand-ins (tests/standins.py) on trio's autojump clock: one engine makes
room for another (by sleep, or by stop when it cannot sleep), requests in
flight finish before their engine is evicted, and a yield takes the GPU
until it is released. The sandbox tier (test_fleet_sandbox.py) runs the
same against a real user manager and a fake GPU."""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from shim import config, events, learned
from shim.engine import Engine
from shim.errors import GpuBusy, GpuYielded
from shim.fleet import Fleet
from shim.gpu import GpuMemory
from shim.lifecycle import State
from tests.standins import FakeSystemd, FakeVllm, standins

__all__ = ["standins"]  # the fixture

Standins = tuple[FakeSystemd, FakeVllm]
MiB = 2**20
GPU_MIB = 1000
ENGINE_MIB = 600  # one engine fits, not two
MAX_WAITING = 10


@dataclass
class FakeGpu:
    """A GPU whose free memory is what the running, awake engines leave."""

    sd: FakeSystemd
    vllm: FakeVllm
    engines: dict[str, Engine]

    async def memory(self) -> GpuMemory | None:
        await trio.lowlevel.checkpoint()
        used = sum(ENGINE_MIB * MiB for e in self.engines.values()
                   if self.sd.running(e.cfg.unit) and e.cfg.port not in self.vllm.asleep)
        return GpuMemory(GPU_MIB * MiB, GPU_MIB * MiB - used, "stand-in GPU")

    def describe(self) -> str:
        return "stand-in GPU"


@pytest.fixture(autouse=True)
def private_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds are files in the runtime folder: a private one per test."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def gateway_config(**engines: dict[str, object]) -> config.GatewayConfig:
    tables = {name: {"command": [sys.executable, "-c", "pass"], "memory": f"{ENGINE_MIB}MiB",
                     "stop_grace": "5s", **spec} for name, spec in engines.items()}
    return config.parse({"gateway": {"gpu_memory": f"{GPU_MIB}MiB", "min_residency": "1s"},
                         "engines": tables})


@asynccontextmanager
async def fleet_of(sd: FakeSystemd, vllm: FakeVllm, cfg: config.GatewayConfig
                   ) -> AsyncIterator[tuple[Fleet, dict[str, Engine], list[tuple[str, events.EngineEvent]]]]:

    def changed() -> None:
        fleet.engine_changed()

    seen: list[tuple[str, events.EngineEvent]] = []
    engines = {name: Engine(e, sd, changed, store=learned.Store(None),  # type: ignore[arg-type]
                            on_event=functools.partial(lambda name, event: seen.append((name, event)), name))
               for name, e in cfg.engines.items()}
    fleet = Fleet(cfg, engines, FakeGpu(sd, vllm, engines))
    async with trio.open_nursery() as nursery:
        for e in engines.values():
            await nursery.start(e.run)
        nursery.start_soon(fleet.run)
        yield fleet, engines, seen
        nursery.cancel_scope.cancel()


def states(engines: dict[str, Engine]) -> dict[str, State]:
    return {name: e.state for name, e in engines.items()}


async def test_an_engine_that_can_sleep_is_put_to_sleep_to_make_room(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, vllm = standins
    cfg = gateway_config(a={"models": ["alpha"], "port": 8101, "sleep_after": "10m"},
                         b={"models": ["beta"], "port": 8102})
    async with fleet_of(sd, vllm, cfg) as (fleet, engines, seen):
        async with engines["a"].lease(MAX_WAITING):
            pass
        await trio.sleep(2.0)  # past min_residency
        async with engines["b"].lease(MAX_WAITING):
            assert states(engines) == {"a": State.SLEEPING, "b": State.READY}
        assert fleet.swaps == 1 and ("b", events.Swap()) in seen
        # alpha again: beta cannot sleep, so it is stopped; alpha wakes
        await trio.sleep(2.0)
        async with engines["a"].lease(MAX_WAITING):
            assert states(engines) == {"a": State.READY, "b": State.STOPPED}
        assert ("b", events.Stop("evicted")) in seen
        assert [svc.name for svc in sd.started] == ["vllm-a.service", "vllm-b.service"]


async def test_an_engine_is_evicted_only_once_its_requests_in_flight_end(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, vllm = standins
    cfg = gateway_config(a={"models": ["alpha"], "port": 8101}, b={"models": ["beta"], "port": 8102})
    async with fleet_of(sd, vllm, cfg) as (_fleet, engines, _seen):
        a_done_at: list[float] = []
        b_served_at: list[float] = []

        async def long_request_for_a() -> None:
            async with engines["a"].lease(MAX_WAITING):
                await trio.sleep(3.0)
                a_done_at.append(trio.current_time())

        async def request_for_b() -> None:
            async with engines["b"].lease(MAX_WAITING):
                b_served_at.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_request_for_a)
            assert await engines["a"].wait_for(State.READY, timeout_s=5)
            nursery.start_soon(request_for_b)
        assert a_done_at and b_served_at and b_served_at[0] > a_done_at[0]
        assert states(engines) == {"a": State.STOPPED, "b": State.READY}


async def test_a_yield_takes_the_gpu_until_it_is_released(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, vllm = standins
    cfg = gateway_config(a={"models": ["alpha"], "port": 8101, "sleep_after": "10m"},
                         b={"models": ["beta"], "port": 8102})
    async with fleet_of(sd, vllm, cfg) as (fleet, engines, _seen):
        async with engines["a"].lease(MAX_WAITING):
            pass
        assert await fleet.hold("whisper", timeout_s=30)
        assert states(engines) == {"a": State.SLEEPING, "b": State.STOPPED}
        t0 = trio.current_time()
        with pytest.raises(GpuYielded, match=r"yielded to other work \(whisper\)"):
            await engines["b"].acquire(MAX_WAITING)
        assert trio.current_time() == t0  # answered at once
        assert len(sd.started) == 1
        fleet.release("whisper")
        async with engines["b"].lease(MAX_WAITING):
            assert engines["b"].state is State.READY


async def test_mixed_requests_swap_in_batches_not_at_every_request(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    # Requests for one engine are admitted together: ten requests that
    # alternate between two engines that cannot share the GPU cost one swap.
    sd, vllm = standins
    cfg = gateway_config(a={"models": ["alpha"], "port": 8101, "sleep_after": "10m"},
                         b={"models": ["beta"], "port": 8102, "sleep_after": "10m"})
    async with fleet_of(sd, vllm, cfg) as (fleet, engines, _seen):
        served: list[str] = []

        async def one(name: str) -> None:
            async with engines[name].lease(MAX_WAITING):
                served.append(name)
                await trio.sleep(0.5)

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, "ab"[i % 2])
        assert sorted(served) == ["a"] * 5 + ["b"] * 5
        assert served == sorted(served) or served == sorted(served, reverse=True)
        assert fleet.swaps == 1 and len(sd.started) == 2
        await trio.testing.wait_all_tasks_blocked()
        assert all(e.busy == 0 for e in engines.values())


async def test_an_engine_larger_than_the_gpu_is_refused_at_once(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, vllm = standins
    cfg = gateway_config(a={"models": ["alpha"], "port": 8101, "memory": f"{GPU_MIB * 2}MiB"})
    async with fleet_of(sd, vllm, cfg) as (_fleet, engines, _seen):
        with pytest.raises(GpuBusy, match="not enough GPU memory for the engine 'a'"):
            await engines["a"].acquire(MAX_WAITING)
        await trio.testing.wait_all_tasks_blocked()
        assert not sd.started and engines["a"].busy == 0 and not engines["a"].holds_memory
