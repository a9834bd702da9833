"""What an engine reports as it goes, for whoever keeps metrics and the
status page's history: small typed values, so that a misspelt event is a
type error rather than a metric that silently never counts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ColdStart:
    """The engine became ready; `seconds` is what the first client waited."""

    seconds: float


@dataclass(frozen=True)
class Wake:
    """The engine woke from sleep in `seconds`."""

    seconds: float


@dataclass(frozen=True)
class Sleep:
    """The engine went to sleep."""


@dataclass(frozen=True)
class Stop:
    """The engine's unit went away; `cause` says why (idle, manual, external, ...)."""

    cause: str


@dataclass(frozen=True)
class StartFailure:
    """A start failed (the cool-down before the next one begins)."""


@dataclass(frozen=True)
class Swap:
    """The fleet made room on the GPU for this engine."""


EngineEvent = ColdStart | Wake | Sleep | Stop | StartFailure | Swap
