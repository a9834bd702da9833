"""The engine's lifecycle as named states and one table of transitions.

Pure logic: no I/O. The engine owner (engine.py) is the only caller.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"
    GOING_TO_SLEEP = "going_to_sleep"
    SLEEPING = "sleeping"
    WAKING = "waking"


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
