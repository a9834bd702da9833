"""The schema of `GET /gateway/status`: typed, and turned into JSON in one
place.

The shim fills it from its engines and its fleet (GatewayStatus); the
command line reads it back (`parse`) or, when the shim does not answer,
fills one engine's part from systemd (`without_shim`), and renders the
typed value either way (commands.py). Field names are the JSON keys; the
states are lifecycle.py's. One engine is a fleet of one: only `as_json`
tells them apart, where it puts the only engine's fields at the top level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import TypeVar

from . import lifecycle

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


@dataclass(frozen=True)
class EngineEntry:
    """One engine's entry under "engines". `on_gpu` is None only in the
    status of an older shim, which did not have those fields."""

    status: EngineStatus
    on_gpu: EngineOnGpu | None
    start_phase: str | None = None  # while it starts: how far it got, from its journal

    def fields_json(self) -> dict[str, object]:
        return {**self.status.as_json(), **(self.on_gpu.as_json() if self.on_gpu is not None else {})}

    def as_json(self) -> dict[str, object]:
        out = self.fields_json()
        if self.start_phase is not None:
            out["start_phase"] = self.start_phase
        return out


@dataclass(frozen=True)
class FleetStatus:
    """The GPUs, what holds them, and the engines' swaps (fleet.py, gpustatus.py)."""

    holds: Mapping[str, float]  # holder: since when
    swaps: int
    gpu: Mapping[str, object] | None  # the default GPU: total_bytes, free_bytes, source
    gpus: Mapping[str, object]  # each GPU by index: reading, engines, holders
    held_gpus: Mapping[str, object]  # each holder: its GPUs (None: all)

    def as_json(self) -> dict[str, object]:
        return _json(self)


@dataclass(frozen=True)
class GatewayStatus:
    """The whole of `GET /gateway/status`."""

    engines: Mapping[str, EngineEntry]  # in the configuration's order
    fleet: FleetStatus
    process: GatewayProcess

    @property
    def state(self) -> str:
        """One state for all engines: the most awake (lifecycle.summary)."""
        return lifecycle.summary(
            s for e in self.engines.values() if (s := lifecycle.named(e.status.state)) is not None).value

    def as_json(self) -> dict[str, object]:
        """With one engine, its fields at the top level too, as before there
        were several; with several, one state for all, and their requests in
        flight and waiting summed."""
        entries = {name: e.as_json() for name, e in self.engines.items()}
        only = next(iter(self.engines.values())) if len(self.engines) == 1 else None
        top: dict[str, object] = only.fields_json() if only is not None else {
            "state": self.state,
            "in_flight": sum(e.status.in_flight for e in self.engines.values()),
            "waiting": sum(e.status.waiting for e in self.engines.values()),
        }
        out = {**top, "engines": entries, **self.fleet.as_json(), **self.process.as_json()}
        if only is not None and only.start_phase is not None:
            out["start_phase"] = only.start_phase
        return out


@dataclass(frozen=True)
class EngineView:
    """One engine as the command line shows it: its entry in the shim's
    status (`gateway` the whole), or what systemd alone tells of it."""

    entry: EngineEntry
    process: GatewayProcess
    gateway: GatewayStatus | None = None

    def as_json(self) -> dict[str, object]:
        """The whole status with the engine's own fields on top; without the
        shim, the keys of one engine (STATUS_KEYS)."""
        if self.gateway is None:
            return {**self.entry.status.as_json(), **self.process.as_json()}
        return {**self.gateway.as_json(), **self.entry.as_json()}


def engine_view(status: GatewayStatus, name: str) -> EngineView | None:
    """The engine `name` in the shim's status; None where the shim has no such engine."""
    entry = status.engines.get(name)
    return None if entry is None else EngineView(entry, status.process, status)


def without_shim(engine: EngineStatus, process: GatewayProcess) -> EngineView:
    """What the command line shows of one engine when the shim does not answer."""
    return EngineView(EngineEntry(engine, None), process)


# ---- reading it back (the command line) ----


class StatusError(ValueError):
    """A status that does not fit the schema; the message names the key."""


def parse(data: object) -> GatewayStatus:
    """The status from its JSON (as `GatewayStatus.as_json` writes it).
    Fields added since a shim was built take their defaults; anything else
    raises StatusError."""
    top = _object(data, "the status")
    engines = _object(top.get("engines"), "engines")
    return GatewayStatus(
        engines={name: _entry(_object(e, f"engines.{name}"), f"engines.{name}")
                 for name, e in engines.items()},
        fleet=_typed(FleetStatus, top, ""),
        process=_typed(GatewayProcess, top, ""),
    )


def _entry(data: Mapping[str, object], where: str) -> EngineEntry:
    on_gpu = _typed(EngineOnGpu, data, where + ".") if all(f.name in data for f in fields(EngineOnGpu)) \
        else None
    phase = data.get("start_phase")
    if phase is not None and not isinstance(phase, str):
        raise StatusError(f"status: {where}.start_phase: not a text")
    return EngineEntry(_typed(EngineStatus, data, where + "."), on_gpu, phase)


_T = TypeVar("_T")
_SCALARS: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float), "bool": bool}


def _typed(cls: type[_T], data: Mapping[str, object], where: str) -> _T:
    """A dataclass of this module from a JSON object, each field checked
    against its annotation."""
    values: dict[str, object] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            if f.default is MISSING:
                raise StatusError(f"status: {where}{f.name}: missing")
            continue
        values[f.name] = _value(data[f.name], str(f.type), f"{where}{f.name}")
    return cls(**values)


def _value(value: object, annotation: str, where: str) -> object:
    for kind in (part.strip() for part in annotation.split("|")):
        if kind == "None":
            if value is None:
                return None
        elif kind.startswith("tuple["):
            item = kind[len("tuple["):].split(",")[0]
            if isinstance(value, list) and all(_is(v, item) for v in value):
                return tuple(value)
        elif kind.startswith("Mapping["):
            if isinstance(value, dict):
                return value
        elif _is(value, kind):
            return value
    raise StatusError(f"status: {where}: not {annotation}: {value!r}")


def _is(value: object, kind: str) -> bool:
    if isinstance(value, bool) and kind != "bool":
        return False
    return isinstance(value, _SCALARS[kind])


def _object(value: object, where: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise StatusError(f"status: {where}: not an object")
    return value


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
