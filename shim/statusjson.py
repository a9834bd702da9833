"""The schema of `GET /gateway/status`: typed, and turned into JSON in one
place.

The shim fills it from its engines and its fleet (server.py); the command
line fills the engine's part from systemd when the shim does not answer
(commands.py), and renders what it got (the JSON of either). Field names
are the JSON keys; the states are lifecycle.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

# Decimals kept in the JSON, by key: milliseconds for times and durations
# that matter to a person at that scale, a tenth of a second for idle time.
_DECIMALS = {"state_since": 3, "idle_s": 1, "last_wake_s": 3, "last_cold_start_s": 3, "last_error_at": 3,
             "gateway_uptime_s": 1}


@dataclass(frozen=True)
class EngineStatus:
    """One engine's fields, known with or without the shim."""

    state: str  # a lifecycle.State's value; without the shim, systemd's ActiveState
    state_since: float | None  # epoch seconds
    idle_s: float | None
    in_flight: int  # requests in flight or waiting
    waiting: int
    engine: str
    unit: str
    main_pid: int | None
    port: int
    models: tuple[str, ...]
    stop_after_s: float | None
    sleep_after_s: float | None
    sleep_level: int
    sleep_enabled: bool
    last_sleep_error: str | None = None
    last_wake_s: float | None = None
    last_cold_start_s: float | None = None
    # the last error in one line, when (epoch seconds), and whether a start succeeded since
    last_error: str | None = None
    last_error_at: float | None = None
    last_error_past: bool | None = None
    # vLLM refused sleep mode (now or, as learned, at an earlier start): why
    sleep_refused: str | None = None

    def as_json(self) -> dict[str, object]:
        return _json(self)


@dataclass(frozen=True)
class EngineOnGpu:
    """What only the shim knows of an engine: its place on the GPUs."""

    expected_start_s: float | None
    memory_bytes: int | None
    pinned: bool
    draining: bool
    last_memory_check: Mapping[str, object] | None
    gpus: tuple[int, ...]
    measured_memory: Mapping[str, object]

    def as_json(self) -> dict[str, object]:
        return _json(self)


@dataclass(frozen=True)
class GatewayProcess:
    """The shim's own process; None for both when it does not run."""

    gateway_pid: int | None
    gateway_uptime_s: float | None

    def as_json(self) -> dict[str, object]:
        return _json(self)


# The keys that the status of one engine has, from the shim or from systemd.
STATUS_KEYS = tuple(f.name for t in (EngineStatus, GatewayProcess) for f in fields(t))


def engine_json(engine: EngineStatus, on_gpu: EngineOnGpu) -> dict[str, object]:
    """One engine's entry under "engines"."""
    return {**engine.as_json(), **on_gpu.as_json()}


def without_shim_json(engine: EngineStatus, process: GatewayProcess) -> dict[str, object]:
    """What the command line shows of one engine when the shim does not answer."""
    return {**engine.as_json(), **process.as_json()}


def gateway_json(
    engines: Mapping[str, tuple[EngineStatus, EngineOnGpu]], *, summary: str | None,
    in_flight: int, fleet: Mapping[str, object], process: GatewayProcess,
) -> dict[str, object]:
    """The whole status. With one engine (`summary` None), that engine's
    fields at the top level too, as before there were several; with several,
    one state for all (lifecycle.summary), requests in flight and waiting."""
    entries = {name: engine_json(*parts) for name, parts in engines.items()}
    if summary is None:
        (only,) = entries.values()
        out: dict[str, object] = dict(only)
    else:
        out = {"state": summary, "in_flight": in_flight,
               "waiting": sum(status.waiting for status, _ in engines.values())}
    return {**out, "engines": entries, **fleet, **process.as_json()}


def _json(value: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in fields(value):  # type: ignore[arg-type]
        v = getattr(value, f.name)
        if isinstance(v, float) and f.name in _DECIMALS:
            v = round(v, _DECIMALS[f.name])
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, Mapping):
            v = dict(v)
        out[f.name] = v
    return out
