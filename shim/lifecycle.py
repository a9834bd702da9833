"""The engine's lifecycle as named states, their groups, and one table of
transitions.

Pure logic: no I/O. The engine owner (engine.py) alone moves an engine
through the table; everything else (the fleet, the status, the idle check,
the command line) asks which group a state is in here rather than naming
states of its own.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"
    GOING_TO_SLEEP = "going_to_sleep"
    SLEEPING = "sleeping"
    WAKING = "waking"


# The groups of states that the rest of the gateway asks about.

# The engine holds (or is taking) its GPU memory.
AWAKE = frozenset({State.STARTING, State.READY, State.WAKING, State.GOING_TO_SLEEP, State.STOPPING})
# The sleep tier of the idle check applies (sleep_after): only a ready engine goes to sleep.
SLEEP_TIER = frozenset({State.READY})
# The stop tier applies (stop_after): the engine runs, awake or asleep.
STOP_TIER = frozenset({State.READY, State.GOING_TO_SLEEP, State.SLEEPING, State.WAKING})
# Several engines in one word: the first of these that any engine is in.
MOST_AWAKE_FIRST = (State.READY, State.WAKING, State.STARTING, State.GOING_TO_SLEEP, State.STOPPING,
                    State.SLEEPING, State.FAILED, State.STOPPED)
# How people see a state: serving, on the way up or down, resting, off, broken.
SERVING = frozenset({State.READY})
CHANGING = frozenset({State.STARTING, State.WAKING, State.STOPPING})
RESTING = frozenset({State.GOING_TO_SLEEP, State.SLEEPING})
OFF = frozenset({State.STOPPED})
BROKEN = frozenset({State.FAILED})


def summary(states: Iterable[State]) -> State:
    """One state for several engines: the most awake among them."""
    present = set(states)
    return next((s for s in MOST_AWAKE_FIRST if s in present), State.STOPPED)


def named(value: str) -> State | None:
    """The state of that name (as in STATUS texts and /gateway/status); None
    for anything else, such as systemd's own words when the shim is not running."""
    try:
        return State(value)
    except ValueError:
        return None


class Event(enum.Enum):
    START = "start"  # the owner asked systemd to start the unit
    ADOPT = "adopt"  # the unit was found running (e.g. after a shim restart)
    HEALTHY = "healthy"  # the engine answered its health check
    STOP = "stop"  # the owner asked systemd to stop the unit
    UNIT_DEACTIVATING = "unit_deactivating"  # somebody else is stopping it
    UNIT_GONE = "unit_gone"  # the unit is inactive, failed or unloaded
    START_FAILED = "start_failed"  # timeout, or the unit died before healthy
    RESET = "reset"  # the failure was reported; ready to try again
    SLEEP = "sleep"  # the owner asked the engine to sleep
    SLEPT = "slept"  # the engine confirmed it sleeps
    SLEEP_FAILED = "sleep_failed"  # the engine refused or failed to sleep; it is still awake
    FOUND_ASLEEP = "found_asleep"  # an adopted engine was already asleep
    WAKE = "wake"  # the owner started the wake sequence
    WAKE_FAILED = "wake_failed"  # the wake sequence failed; the unit is stopped


class LifecycleError(Exception):
    """An event that the current state does not allow."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"engine lifecycle: event {event.value!r} is illegal in state {state.value!r}")
        self.state = state
        self.event = event


S, E = State, Event

TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.STOPPED, E.START): S.STARTING,
    (S.STOPPED, E.ADOPT): S.STARTING,
    (S.STOPPED, E.UNIT_GONE): S.STOPPED,
    (S.STOPPED, E.UNIT_DEACTIVATING): S.STOPPING,
    (S.STARTING, E.HEALTHY): S.READY,
    (S.STARTING, E.START_FAILED): S.FAILED,
    (S.STARTING, E.STOP): S.STOPPING,
    (S.STARTING, E.UNIT_DEACTIVATING): S.STOPPING,
    (S.STARTING, E.UNIT_GONE): S.FAILED,
    (S.READY, E.STOP): S.STOPPING,
    (S.READY, E.UNIT_DEACTIVATING): S.STOPPING,
    (S.READY, E.UNIT_GONE): S.STOPPED,
    (S.READY, E.HEALTHY): S.READY,
    (S.STOPPING, E.UNIT_GONE): S.STOPPED,
    (S.STOPPING, E.UNIT_DEACTIVATING): S.STOPPING,
    (S.STOPPING, E.STOP): S.STOPPING,
    (S.STOPPING, E.START_FAILED): S.STOPPING,
    (S.FAILED, E.RESET): S.STOPPED,
    (S.FAILED, E.UNIT_GONE): S.FAILED,
    (S.FAILED, E.UNIT_DEACTIVATING): S.FAILED,
    (S.FAILED, E.STOP): S.FAILED,
    (S.FAILED, E.ADOPT): S.STARTING,
    (S.STARTING, E.FOUND_ASLEEP): S.SLEEPING,
    (S.READY, E.SLEEP): S.GOING_TO_SLEEP,
    (S.GOING_TO_SLEEP, E.SLEPT): S.SLEEPING,
    (S.GOING_TO_SLEEP, E.SLEEP_FAILED): S.READY,
    (S.SLEEPING, E.WAKE): S.WAKING,
    (S.WAKING, E.HEALTHY): S.READY,
    (S.WAKING, E.WAKE_FAILED): S.STOPPING,
}
# Whatever the engine is doing while asleep or between, systemd has the last word.
for _s in (S.GOING_TO_SLEEP, S.SLEEPING, S.WAKING):
    TRANSITIONS[(_s, E.STOP)] = S.STOPPING
    TRANSITIONS[(_s, E.UNIT_DEACTIVATING)] = S.STOPPING
    TRANSITIONS[(_s, E.UNIT_GONE)] = S.STOPPED


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise LifecycleError(state, event) from None
