"""The engine lifecycle: one table of transitions, and nothing else allowed."""

from __future__ import annotations

import itertools

import pytest

from shim import lifecycle
from shim.lifecycle import TRANSITIONS, Event, LifecycleError, State, next_state

S, E = State, Event
PAIRS = list(itertools.product(State, Event))


@pytest.mark.parametrize(("state", "event"), PAIRS, ids=[f"{s.value}-{e.value}" for s, e in PAIRS])
def test_every_pair_maps_or_raises(state: State, event: Event) -> None:
    if (state, event) in TRANSITIONS:
        assert next_state(state, event) is TRANSITIONS[(state, event)]
        return
    with pytest.raises(LifecycleError) as info:
        next_state(state, event)
    err = info.value
    assert err.state is state
    assert err.event is event
    message = str(err)
    assert repr(state.value) in message
    assert repr(event.value) in message
    assert "engine lifecycle" in message
    assert err.__cause__ is None and err.__suppress_context__


def test_table_only_names_states_and_events() -> None:
    for (state, event), target in TRANSITIONS.items():
        assert isinstance(state, State)
        assert isinstance(event, Event)
        assert isinstance(target, State)


def reachable_from(start: State) -> set[State]:
    seen = {start}
    todo = [start]
    while todo:
        s = todo.pop()
        for (frm, _event), to in TRANSITIONS.items():
            if frm is s and to not in seen:
                seen.add(to)
                todo.append(to)
    return seen


def test_every_state_reachable_from_stopped() -> None:
    assert reachable_from(S.STOPPED) == set(State)


def test_every_state_can_get_back_to_stopped() -> None:
    for state in State:
        assert S.STOPPED in reachable_from(state), state


def test_every_state_accepts_unit_gone() -> None:
    # systemd has the last word: a vanished unit is never an illegal event.
    for state in State:
        next_state(state, E.UNIT_GONE)


@pytest.mark.parametrize(
    ("path", "end"),
    [
        ([E.START, E.HEALTHY], S.READY),
        ([E.START, E.HEALTHY, E.STOP, E.UNIT_GONE], S.STOPPED),
        ([E.START, E.START_FAILED, E.RESET], S.STOPPED),
        ([E.START, E.UNIT_GONE], S.FAILED),
        ([E.ADOPT, E.HEALTHY, E.UNIT_GONE], S.STOPPED),
        ([E.UNIT_DEACTIVATING, E.UNIT_GONE], S.STOPPED),
        ([E.START, E.START_FAILED, E.ADOPT], S.STARTING),
    ],
)
def test_paths_from_stopped(path: list[Event], end: State) -> None:
    state = S.STOPPED
    for event in path:
        state = next_state(state, event)
    assert state is end


@pytest.mark.parametrize(
    ("state", "event"),
    [(S.STOPPED, E.HEALTHY), (S.STOPPED, E.STOP), (S.READY, E.START), (S.STARTING, E.START),
     (S.FAILED, E.START), (S.FAILED, E.HEALTHY), (S.STOPPING, E.START)],
)
def test_known_illegal(state: State, event: Event) -> None:
    with pytest.raises(LifecycleError, match=rf"event '{event.value}' is illegal in state '{state.value}'"):
        next_state(state, event)


# ---- the groups of states ----


def test_every_state_has_exactly_one_group_for_people() -> None:
    groups = [lifecycle.SERVING, lifecycle.CHANGING, lifecycle.RESTING, lifecycle.OFF, lifecycle.BROKEN]
    assert sorted(s.value for g in groups for s in g) == sorted(s.value for s in S)


def test_the_idle_tiers_apply_to_running_engines_only() -> None:
    assert lifecycle.SLEEP_TIER <= lifecycle.STOP_TIER
    assert not lifecycle.STOP_TIER & {S.STOPPED, S.FAILED, S.STARTING, S.STOPPING}


def test_several_engines_summed_up_by_the_most_awake() -> None:
    assert set(lifecycle.MOST_AWAKE_FIRST) == set(S)
    assert lifecycle.summary([S.SLEEPING, S.READY, S.FAILED]) is S.READY
    assert lifecycle.summary([S.SLEEPING, S.FAILED]) is S.SLEEPING
    assert lifecycle.summary([]) is S.STOPPED


def test_states_by_name() -> None:
    assert lifecycle.named("going_to_sleep") is S.GOING_TO_SLEEP
    assert lifecycle.named("active") is None  # systemd's word, not ours
