"""The idle check's decision, for every case, without systemd."""

from __future__ import annotations

import dataclasses

import pytest

from shim.config import EngineConfig
from shim.idle_check import Action, decide, verdict
from shim.status import ShimStatus
from shim.systemd import GONE, UnitState

NOW = 1_800_000_000.0
ENGINE = EngineConfig(name="main", command=("vllm", "serve", "m"), stop_after_s=600.0)
ENGINE_UP = UnitState("active", "running", active_enter_us=int((NOW - 3600) * 1e6))


def shim_up(in_flight: int = 0, idle_s: float | None = 0.0, state: str = "ready") -> UnitState:
    idle_since = None if idle_s is None else NOW - idle_s
    text = ShimStatus(state, in_flight, idle_since, ENGINE.unit).format(NOW)
    return UnitState("active", "running", status_text=text)


@pytest.mark.parametrize("active_state", ["inactive", "failed", "deactivating", GONE])
def test_engine_not_running_is_kept(active_state: str) -> None:
    unit = UnitState(active_state)
    verdict = decide(ENGINE, unit, shim_up(idle_s=10**6), NOW)
    assert not verdict.stop
    assert f"vllm.service is not running ({active_state})" in verdict.reason


@pytest.mark.parametrize("active_state", ["active", "activating", "reloading"])
def test_running_states_count(active_state: str) -> None:
    unit = dataclasses.replace(ENGINE_UP, active_state=active_state)
    assert decide(ENGINE, unit, shim_up(idle_s=601), NOW).stop


def test_stop_after_off_is_kept() -> None:
    engine = dataclasses.replace(ENGINE, stop_after_s=None)
    assert not decide(engine, ENGINE_UP, shim_up(idle_s=10**7), NOW).stop
    gone_shim = UnitState("inactive", inactive_enter_us=1)
    assert not decide(engine, ENGINE_UP, gone_shim, NOW).stop


@pytest.mark.parametrize("in_flight", [1, 7])
def test_requests_in_flight_are_kept(in_flight: int) -> None:
    verdict = decide(ENGINE, ENGINE_UP, shim_up(in_flight=in_flight, idle_s=None), NOW)
    assert not verdict.stop
    assert verdict.reason == f"{in_flight} requests in flight"


def test_in_flight_wins_over_a_stale_idle_since() -> None:
    # Even if a text says idle for long, a request in flight keeps the engine.
    text = f"state=ready in_flight=1 idle_since={NOW - 10**6:.3f} idle_s=0 unit=vllm.service"
    shim = UnitState("active", status_text=text)
    assert not decide(ENGINE, ENGINE_UP, shim, NOW).stop


@pytest.mark.parametrize("idle_s", [0.0, 1.0, 599.0, 599.999])
def test_idle_below_threshold_is_kept(idle_s: float) -> None:
    verdict = decide(ENGINE, ENGINE_UP, shim_up(idle_s=idle_s), NOW)
    assert not verdict.stop
    assert "idle" in verdict.reason


@pytest.mark.parametrize("idle_s", [600.0, 601.0, 86400.0])
def test_idle_at_or_past_threshold_stops(idle_s: float) -> None:
    verdict = decide(ENGINE, ENGINE_UP, shim_up(idle_s=idle_s), NOW)
    assert verdict.stop
    assert f"idle {idle_s:.0f} s, past stop_after 600 s" == verdict.reason


def test_idle_since_in_the_future_counts_as_zero() -> None:
    assert not decide(ENGINE, ENGINE_UP, shim_up(idle_s=-100.0), NOW).stop


@pytest.mark.parametrize(
    "text", ["", "starting", "state=ready in_flight=? idle_since=- unit=u", "READY=1"]
)
def test_shim_status_unparsable_is_kept(text: str) -> None:
    shim = UnitState("active", "running", status_text=text)
    verdict = decide(ENGINE, ENGINE_UP, shim, NOW)
    assert not verdict.stop
    assert verdict.reason == "vllm-gateway.service has not reported its status yet"


def test_activating_shim_without_status_is_kept() -> None:
    assert not decide(ENGINE, ENGINE_UP, UnitState("activating"), NOW).stop


def us(t: float) -> int:
    return int(t * 1e6)


@pytest.mark.parametrize(
    ("engine_start", "shim_exit", "stop"),
    [
        (NOW - 700, NOW - 800, True),  # engine started after the shim left: counts from the start
        (NOW - 500, NOW - 800, False),
        (NOW - 3600, NOW - 700, True),  # shim left after the engine started: counts from the exit
        (NOW - 3600, NOW - 500, False),
        (NOW - 3600, 0, True),  # the shim never ran: counts from the engine's start
        (NOW - 100, 0, False),
        (NOW - 600, NOW - 600, True),  # exactly the threshold
    ],
)
@pytest.mark.parametrize("shim_state", ["inactive", "failed", GONE, "deactivating"])
def test_shim_not_running_counts_from_later_of_start_and_exit(
    engine_start: float, shim_exit: float, stop: bool, shim_state: str
) -> None:
    unit = UnitState("active", "running", active_enter_us=us(engine_start))
    shim = UnitState(shim_state, inactive_enter_us=us(shim_exit), status_text="state=ready stale")
    verdict = decide(ENGINE, unit, shim, NOW)
    assert verdict.stop is stop
    idle = NOW - max(engine_start, shim_exit)
    assert f"idle {idle:.0f} s" in verdict.reason


def test_shim_not_running_ignores_its_last_status() -> None:
    # A stopped shim's last STATUS may say "in flight": it no longer serves anything.
    unit = UnitState("active", active_enter_us=us(NOW - 3600))
    text = ShimStatus("ready", 5, None, "vllm.service").format(NOW)
    shim = UnitState("inactive", inactive_enter_us=us(NOW - 3000), status_text=text)
    assert decide(ENGINE, unit, shim, NOW).stop


# ---- the sleep tier ----


@pytest.mark.parametrize(
    ("idle_s", "state", "action"),
    [
        (100, "ready", Action.NONE),
        (300, "ready", Action.SLEEP),
        (300, "sleeping", Action.NONE),  # already asleep
        (300, "starting", Action.NONE),
        (600, "sleeping", Action.STOP),  # stop_after still applies to a sleeping engine
        (600, "ready", Action.STOP),
    ],
)
def test_sleep_tier(idle_s: float, state: str, action: Action) -> None:
    engine = dataclasses.replace(ENGINE, sleep_after_s=300.0)
    verdict = decide(engine, ENGINE_UP, shim_up(idle_s=idle_s, state=state), NOW)
    assert verdict.action is action


def test_sleep_tier_needs_the_shim() -> None:
    engine = dataclasses.replace(ENGINE, sleep_after_s=300.0, stop_after_s=None)
    shim = UnitState("inactive", inactive_enter_us=us(NOW - 3000))
    verdict = decide(engine, ENGINE_UP, shim, NOW)
    assert verdict.action is Action.NONE


def test_an_engine_that_refused_sleep_mode_is_never_asked_to_sleep() -> None:
    engine = dataclasses.replace(ENGINE, sleep_after_s=60.0, stop_after_s=600.0)
    idle_since = NOW - 300
    text = ShimStatus("ready", 0, idle_since, ENGINE.unit, can_sleep=False).format(NOW)
    shim = UnitState("active", "running", status_text=text)
    assert decide(engine, ENGINE_UP, shim, NOW).action is Action.NONE
    # the stop tier still applies
    late = ShimStatus("ready", 0, NOW - 700, ENGINE.unit, can_sleep=False).format(NOW)
    assert decide(engine, ENGINE_UP, UnitState("active", "running", status_text=late), NOW).stop


@pytest.mark.parametrize("idle_s", [0.0, 599.0, 600.0, 10**6])
@pytest.mark.parametrize("in_flight", [0, 1])
def test_the_rule_on_a_load_is_the_one_decide_applies_to_the_status(idle_s: float, in_flight: int) -> None:
    from_status = decide(ENGINE, ENGINE_UP, shim_up(in_flight=in_flight, idle_s=idle_s), NOW)
    assert verdict(ENGINE, "ready", in_flight, idle_s, True) == from_status
