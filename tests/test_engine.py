"""The engine's owner task against in-memory stand-ins for systemd and the
engine's endpoints (tests/standins.py), on trio's autojump clock: start,
ready, start failure and cool-down, sleep and wake, and stops that race
requests, each in milliseconds. The sandbox tier runs the same against a
real user manager."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from shim import events, learned
from shim.config import EngineConfig
from shim.engine import FAILURE_COOLDOWN_S, IDLE_TIMER, Engine
from shim.errors import EngineUnavailable, QueueFull
from shim.lifecycle import State
from tests.standins import FakeSystemd, FakeVllm, standins

__all__ = ["standins"]  # the fixture

Standins = tuple[FakeSystemd, FakeVllm]
UNIT = "vllm.service"
MAX_WAITING = 10


def config(**extra: object) -> EngineConfig:
    fields: dict[str, object] = {"name": "main", "command": (sys.executable, "-c", "pass"), "port": 8100,
                                 "models": ("m",), "start_timeout_s": 60.0, "stop_grace_s": 5.0,
                                 "stop_timeout_s": 10.0}
    return EngineConfig(**{**fields, **extra})  # type: ignore[arg-type]


@asynccontextmanager
async def running(
        sd: FakeSystemd, cfg: EngineConfig) -> AsyncIterator[tuple[Engine, list[events.EngineEvent]]]:
    """An engine whose owner task runs; yields it with the events it reported."""
    seen: list[events.EngineEvent] = []
    engine = Engine(cfg, sd, store=learned.Store(None), on_event=seen.append)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        yield engine, seen
        nursery.cancel_scope.cancel()


async def test_a_request_starts_the_engine_and_waits_until_it_is_ready(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, vllm = standins
    async with running(sd, config()) as (engine, seen):
        assert engine.state is State.STOPPED and not sd.started
        async with engine.lease(MAX_WAITING) as lease:
            assert engine.state is State.READY
            assert vllm.start_s <= lease.waited_s < vllm.start_s + 0.2  # health is polled every 50 ms
            assert engine.active == 1
        (svc,) = sd.started
        assert svc.name == UNIT and tuple(svc.wants) == (IDLE_TIMER,)
        assert [type(e) for e in seen] == [events.ColdStart]
        # a second request finds it ready: no wait, no second start
        async with engine.lease(MAX_WAITING) as lease:
            assert lease.waited_s == 0.0
        assert len(sd.started) == 1


async def test_requests_that_arrive_during_a_start_share_it(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, _ = standins
    served: list[float] = []
    async with running(sd, config()) as (engine, _seen):

        async def one() -> None:
            async with engine.lease(MAX_WAITING) as lease:
                served.append(lease.waited_s)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
        assert len(served) == 5 and len(sd.started) == 1


async def test_a_crash_during_the_start_fails_the_waiting_requests_then_cools_down(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, vllm = standins
    vllm.start_s = 30.0
    async with running(sd, config()) as (engine, seen):
        async def crash_soon() -> None:
            await engine.wait_for(State.STARTING, timeout_s=5)
            await trio.sleep(1.0)
            sd.crash(UNIT)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(crash_soon)
            with pytest.raises(EngineUnavailable) as failed:
                await engine.acquire(MAX_WAITING)
        message = str(failed.value)
        assert "failed to start" in message and "CUDA out of memory (stand-in)" in message
        assert engine.state is State.FAILED and engine.last_error is not None
        assert seen == [events.StartFailure()]
        # during the cool-down a request is answered at once, with Retry-After
        t0 = trio.current_time()
        with pytest.raises(EngineUnavailable) as cooling:
            await engine.acquire(MAX_WAITING)
        assert trio.current_time() == t0 and 1 <= cooling.value.retry_after_s <= FAILURE_COOLDOWN_S
        assert len(sd.started) == 1
        # after it, the next request starts the engine again, and succeeds
        await trio.sleep(FAILURE_COOLDOWN_S)
        vllm.start_s = 1.0
        async with engine.lease(MAX_WAITING):
            assert engine.state is State.READY
        assert len(sd.started) == 2
        assert engine.last_error is not None and engine.last_error.past


async def test_a_start_past_its_timeout_fails_and_the_unit_is_stopped(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, vllm = standins
    vllm.start_s = 1000.0
    async with running(sd, config(start_timeout_s=20.0)) as (engine, _seen):
        t0 = trio.current_time()
        with pytest.raises(EngineUnavailable, match="did not become ready within 20 s"):
            await engine.acquire(MAX_WAITING)
        assert 20.0 <= trio.current_time() - t0 < 21.0
        assert sd.stopped == [UNIT] and not sd.running(UNIT)
        assert engine.state is State.FAILED


async def test_systemd_refusing_the_start_is_a_start_failure(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, _ = standins
    sd.refuse_starts = "org.freedesktop.DBus.Error.AccessDenied"
    async with running(sd, config()) as (engine, _seen):
        with pytest.raises(EngineUnavailable, match=r"systemd refused to start vllm\.service"):
            await engine.acquire(MAX_WAITING)


async def test_sleep_and_wake(standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, vllm = standins
    async with running(sd, config(sleep_after_s=60.0)) as (engine, seen):
        async with engine.lease(MAX_WAITING):
            pass
        engine.request_sleep("idle")
        assert await engine.wait_for(State.SLEEPING, timeout_s=5)
        assert (8100, "POST", "/sleep?level=1") in vllm.calls
        assert sd.running(UNIT)  # asleep, not stopped
        async with engine.lease(MAX_WAITING) as lease:
            assert engine.state is State.READY
            assert vllm.wake_s <= lease.waited_s < vllm.wake_s + 0.1
        assert [type(e) for e in seen] == [events.ColdStart, events.Sleep, events.Wake]
        assert len(sd.started) == 1


async def test_no_sleep_while_a_request_is_in_flight(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, vllm = standins
    async with running(sd, config(sleep_after_s=60.0)) as (engine, _seen):
        async with engine.lease(MAX_WAITING):
            engine.request_sleep("idle")
            await trio.sleep(1.0)
            assert engine.state is State.READY
        assert not any(path.startswith("/sleep") for _, _, path in vllm.calls)


async def test_an_engine_that_cannot_sleep_is_kept_awake_and_remembers_it(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, vllm = standins
    vllm.can_sleep = False
    async with running(sd, config(sleep_after_s=60.0)) as (engine, _seen):
        async with engine.lease(MAX_WAITING):
            pass
        engine.request_sleep("idle")
        await engine.wait_for(State.GOING_TO_SLEEP, timeout_s=1)
        assert await engine.wait_for(State.READY, timeout_s=5)
        assert engine.sleep_refused and not engine.sleep_enabled
        assert engine.last_sleep_error is not None and "404" in engine.last_sleep_error


async def test_a_failed_wake_stops_the_engine_and_the_next_request_starts_it_cold(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, vllm = standins
    async with running(sd, config(sleep_after_s=60.0)) as (engine, _seen):
        async with engine.lease(MAX_WAITING):
            pass
        engine.request_sleep("idle")
        assert await engine.wait_for(State.SLEEPING, timeout_s=5)
        vllm.fail_wake = True
        async with engine.lease(MAX_WAITING):
            assert engine.state is State.READY
        assert len(sd.started) == 2 and sd.stopped == [UNIT]


async def test_a_stop_waits_for_requests_in_flight_and_a_request_racing_it_starts_it_again(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, _ = standins
    served: list[float] = []
    async with running(sd, config()) as (engine, seen):
        first_may_end = trio.Event()

        async def first() -> None:
            async with engine.lease(MAX_WAITING):
                engine.request_stop("manual")
                await first_may_end.wait()

        async def racing() -> None:
            async with engine.lease(MAX_WAITING) as lease:
                served.append(lease.waited_s)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            assert await engine.wait_for(State.STOPPING, timeout_s=5)
            nursery.start_soon(racing)
            await trio.sleep(2.0)
            # the request in flight holds the stop back (within stop_grace),
            # and the one that came during the stop waits for the next start
            assert sd.running(UNIT) and engine.state is State.STOPPING and not served
            first_may_end.set()
        assert sd.stopped == [UNIT] and len(sd.started) == 2
        assert len(served) == 1 and engine.state is State.READY
        assert events.Stop("manual") in seen


async def test_an_idle_stop_is_refused_while_a_request_is_in_flight(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, _ = standins
    async with running(sd, config(stop_after_s=0.0)) as (engine, _seen):
        async with engine.lease(MAX_WAITING):
            engine.request_stop("idle", only_if_idle=True)
            await trio.sleep(1.0)
            assert engine.state is State.READY and not sd.stopped
        engine.request_stop("idle", only_if_idle=True)
        assert await engine.wait_for(State.STOPPED, timeout_s=5)
        assert sd.stopped == [UNIT]


async def test_a_crash_of_a_ready_engine_is_seen_and_the_next_request_starts_it(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, _ = standins
    async with running(sd, config()) as (engine, seen):
        async with engine.lease(MAX_WAITING):
            pass
        sd.crash(UNIT)
        assert await engine.wait_for(State.STOPPED, timeout_s=1)
        assert seen[-1] == events.Stop("external")
        async with engine.lease(MAX_WAITING):
            assert engine.state is State.READY
        assert len(sd.started) == 2


async def test_a_running_unit_is_adopted_not_started_twice(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, _ = standins
    cfg = config()
    async with running(sd, cfg) as (engine, _seen):
        async with engine.lease(MAX_WAITING):
            pass
    # a new shim (a restart) finds the unit running
    async with running(sd, cfg) as (engine, _seen):
        assert engine.state is State.STARTING
        async with engine.lease(MAX_WAITING):
            assert engine.state is State.READY
        assert len(sd.started) == 1


async def test_a_lease_is_taken_when_ready_and_given_back_once(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, vllm = standins
    async with running(sd, config()) as (engine, _seen):
        assert engine.busy == 0 and engine.idle_since is not None
        lease = await engine.take_lease(MAX_WAITING)
        assert lease.engine == "main" and lease.waited_s >= vllm.start_s
        assert engine.active == 1 and engine.idle_since is None
        assert engine.last_used == trio.current_time()
        await trio.sleep(3.0)
        engine.return_lease(lease)
        await trio.testing.wait_all_tasks_blocked()  # the owner counts it
        assert engine.active == 0 and engine.idle_since is not None
        assert engine.last_used == trio.current_time()
        with pytest.raises(ValueError, match="is not out"):
            engine.return_lease(lease)
        await trio.testing.wait_all_tasks_blocked()
        assert engine.active == 0


async def test_an_admission_holds_memory_until_the_engine_is_awake(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, _ = standins
    async with running(sd, config()) as (engine, seen):
        admitted = trio.Event()

        async def gate(e: Engine) -> None:
            await e.admit(swapped=True)
            admitted.set()
            await trio.lowlevel.checkpoint()

        engine.join_fleet(gate, lambda: None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.acquire, MAX_WAITING)
            await admitted.wait()
            report = engine.report()
            assert report.state is State.STOPPED and report.reserved and report.holds_memory
            assert report.awake_since == report.last_used == trio.current_time()
            assert await engine.wait_for(State.STARTING, timeout_s=1)
            # awake by its state now: the admission has done its work
            assert not engine.reserved and engine.holds_memory
        assert engine.state is State.READY and seen == [events.Swap(), events.ColdStart(seen[1].seconds)]


async def test_an_admission_ends_when_its_request_leaves(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, _ = standins
    async with running(sd, config()) as (engine, _seen):

        async def gate(e: Engine) -> None:
            await e.admit()
            await trio.sleep_forever()  # the request gives up before it passes

        engine.join_fleet(gate, lambda: None)
        with trio.move_on_after(1.0):
            await engine.acquire(MAX_WAITING)
        await trio.testing.wait_all_tasks_blocked()  # the owner hears that it left
        assert not engine.reserved and not engine.holds_memory
        assert engine.busy == 0 and not sd.started


async def test_a_drain_holds_new_requests_at_the_gate_until_the_ones_in_flight_end(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, _ = standins
    async with running(sd, config(sleep_after_s=60.0)) as (engine, _seen):
        gated: list[float] = []
        drained: list[float] = []
        let_in = trio.Event()

        async def gate(e: Engine) -> None:
            gated.append(trio.current_time())
            await let_in.wait()
            await e.admit()

        lease = await engine.take_lease(MAX_WAITING)
        engine.join_fleet(gate, lambda: drained.append(trio.current_time()))
        await engine.drain("sleep", "evicted", "the engine 'b'")
        assert engine.draining and engine.report().draining
        with trio.move_on_after(1.0):
            await engine.acquire(MAX_WAITING)
        assert len(gated) == 1 and not engine.reserved  # it waited at the gate, and left
        assert engine.state is State.READY and not drained  # the request in flight goes on
        engine.return_lease(lease)
        await trio.testing.wait_all_tasks_blocked()
        assert drained == [trio.current_time()]
        # asked again, with nothing in flight: it sleeps
        await engine.drain("sleep", "evicted", "the engine 'b'")
        assert await engine.wait_for(State.SLEEPING, timeout_s=5)
        await engine.undrain()
        let_in.set()
        async with engine.lease(MAX_WAITING):
            assert engine.state is State.READY and not engine.draining


async def test_the_idle_decision_is_the_engines_on_its_live_state(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, _ = standins
    async with running(sd, config(stop_after_s=600.0)) as (engine, _seen):
        async with engine.lease(MAX_WAITING):
            verdict = engine.idle_verdict(time.time() + 3600)
            assert not verdict.stop and verdict.reason == "1 requests in flight"
        await trio.testing.wait_all_tasks_blocked()  # the owner counts the lease back
        assert engine.idle_verdict(time.time() + 601).stop
        # the timer's check read an old status: a request came and went since
        # then, and the engine, idle for less than stop_after, keeps running
        engine.request_stop("idle", only_if_idle=True)
        await trio.sleep(1.0)
        assert engine.state is State.READY and not sd.stopped


async def test_the_idle_checks_stop_after_applies_without_a_reload(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    # The idle check reads the configuration on every tick and sends its
    # stop_after along: a shorter one written to the file since the shim
    # started stops the engine, which still checks its own live load.
    sd, _ = standins
    async with running(sd, config(stop_after_s=600.0)) as (engine, _seen):
        async with engine.lease(MAX_WAITING):
            pass
        await trio.testing.wait_all_tasks_blocked()
        assert not engine.idle_verdict(time.time() + 6).stop
        assert engine.idle_verdict(time.time() + 6, stop_after_s=5.0).stop
        engine.request_stop("idle", only_if_idle=True)  # its own 600 s: kept
        await trio.sleep(1.0)
        assert engine.state is State.READY and not sd.stopped
        engine.request_stop("idle", only_if_idle=True, stop_after_s=0.0)  # the check's: stopped
        assert await engine.wait_for(State.STOPPED, timeout_s=30)
        assert sd.stopped


async def test_the_waiting_bound_holds_for_requests_that_arrive_in_one_step(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    # The owner counts the waiting requests, in the order they asked: a burst
    # that arrives before it runs cannot slip past max_waiting.
    sd, _ = standins
    outcomes: list[str] = []
    async with running(sd, config()) as (engine, _seen):

        async def one() -> None:
            try:
                async with engine.lease(2):
                    outcomes.append("served")
            except QueueFull:
                outcomes.append("full")

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
        assert sorted(outcomes) == ["full", "full", "full", "served", "served"]
        await trio.testing.wait_all_tasks_blocked()
        assert engine.busy == 0 and len(sd.started) == 1


async def test_a_request_that_leaves_as_its_lease_is_granted_gives_it_back(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, vllm = standins
    async with running(sd, config()) as (engine, _seen):
        with trio.move_on_after(vllm.start_s / 2):  # one that gives up while it starts
            await engine.take_lease(MAX_WAITING)
        await trio.testing.wait_all_tasks_blocked()
        assert engine.state is State.STARTING and engine.busy == 0
        assert await engine.wait_for(State.READY, timeout_s=vllm.start_s)
    # one cancelled in the very step the owner grants its lease: it never
    # sees the lease, and the owner takes it back
    scope = trio.CancelScope()

    def cancel_once_ready() -> None:
        if engine.state is State.READY:
            scope.cancel()

    engine = Engine(config(), sd, cancel_once_ready, store=learned.Store(None))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        with scope:
            await engine.take_lease(MAX_WAITING)
        assert scope.cancelled_caught and engine.state is State.READY
        await trio.testing.wait_all_tasks_blocked()
        assert engine.active == 0 and engine.busy == 0 and engine.idle_since is not None
        nursery.cancel_scope.cancel()


async def test_a_lease_taken_before_the_owner_reads_a_sleep_keeps_the_engine_awake(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    # A request that sees the engine ready takes its lease in that step; the
    # owner counts it before it acts on a sleep asked just before: the
    # engine is never put to sleep under a request.
    sd, vllm = standins
    async with running(sd, config(sleep_after_s=60.0)) as (engine, seen):
        async with engine.lease(MAX_WAITING):
            pass
        engine.request_sleep("idle")
        async with engine.lease(MAX_WAITING) as lease:
            assert lease.waited_s == 0.0
            await trio.sleep(1.0)
            assert engine.state is State.READY
        assert [type(e) for e in seen] == [events.ColdStart]
        assert not any(path.startswith("/sleep") for _, _, path in vllm.calls)
        # asked again with nothing in flight, it sleeps; the next request wakes it
        engine.request_sleep("idle")
        await trio.testing.wait_all_tasks_blocked()
        async with engine.lease(MAX_WAITING) as lease:
            assert engine.state is State.READY and lease.waited_s >= vllm.wake_s
        assert [type(e) for e in seen] == [events.ColdStart, events.Sleep, events.Wake]


async def test_the_idle_sleep_is_decided_by_the_engine_on_its_live_state(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    sd, vllm = standins
    async with running(sd, config(sleep_after_s=600.0)) as (engine, seen):
        async with engine.lease(MAX_WAITING):
            pass
        # the idle check read an old status; the engine was used since
        engine.request_sleep("idle", only_if_idle=True)
        await trio.sleep(1.0)
        assert engine.state is State.READY and [type(e) for e in seen] == [events.ColdStart]
        # the check's own sleep_after, read from the file on its tick, applies
        engine.request_sleep("idle", only_if_idle=True, sleep_after_s=0.0)
        assert await engine.wait_for(State.SLEEPING, timeout_s=5)
        assert (8100, "POST", "/sleep?level=1") in vllm.calls


async def test_the_owner_keeps_up_with_many_short_requests(
        standins: Standins, autojump_clock: trio.testing.MockClock) -> None:
    # Each request tells the owner twice (lease taken, given back); an owner
    # that took one message per turn of the scheduler fell ever further
    # behind 32 busy clients, and its inbox grew without bound.
    sd, _ = standins
    async with running(sd, config()) as (engine, _seen):
        async with engine.lease(MAX_WAITING):
            pass
        most = 0

        async def client() -> None:
            nonlocal most
            for _ in range(200):
                async with engine.lease(MAX_WAITING):
                    await trio.lowlevel.checkpoint()
                most = max(most, engine.backlog)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for _ in range(32):
                nursery.start_soon(client)
        assert most <= 2 * 32
        await trio.testing.wait_all_tasks_blocked()
        assert engine.backlog == 0 and engine.active == 0
