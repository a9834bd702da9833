"""Prometheus metrics of the gateway, in the text exposition format.

The engine and the server stay free of metrics code: the engine reports
events through a callback, and live values (state, in flight, time in each
state) are read at scrape time.

A few counters and histograms, written out by hand: recording one request is
a couple of dict and list updates, and the shim does not import (or keep in
memory) a metrics library. The output is what prometheus_client's
`generate_latest` writes for the same metrics (tests/test_metrics.py
compares them).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import assert_never

from .events import ColdStart, EngineEvent, Sleep, StartFailure, Stop, Swap, Wake
from .lifecycle import State

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# Cold starts run from seconds (a small model, warm caches) to many minutes.
COLD_START_BUCKETS_S = (2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)
WAKE_BUCKETS_S = (0.25, 0.5, 1, 2, 3, 5, 10, 20, 60)
REQUEST_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class EngineLive:
    """One engine's values at scrape time."""

    name: str
    state: State
    in_flight: int
    waiting: int
    state_seconds: dict[State, float]


@dataclass(frozen=True)
class GpuLive:
    """One GPU's last reading (None: unknown)."""

    index: int
    total: int | None
    free: int | None


@dataclass(frozen=True)
class HeldLive:
    """What an engine was measured to hold on one GPU: "now", and the figures
    kept for "awake" and "asleep"."""

    engine: str
    gpu: int
    measure: str
    bytes: int


class Live:
    """Values read at scrape time (provided by the server), one per engine."""

    def __init__(self, engines: Callable[[], list[EngineLive]],
                 gpus: Callable[[], list[GpuLive]] = list,
                 held: Callable[[], list[HeldLive]] = list) -> None:
        self.engines = engines
        self.gpus = gpus
        self.held = held


def number(value: float) -> str:
    """A sample value as Prometheus (and its Go client) writes it."""
    d = float(value)
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Labels) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(pairs)) + "}"


class Counter:
    def __init__(self, name: str, help_text: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name = name + "_total"
        self.help = help_text
        self.labelnames = labelnames
        self.values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}\n# TYPE {self.name} counter\n")
        for labels, value in self.values.items():
            pairs = tuple(zip(self.labelnames, labels, strict=True))
            out.append(f"{self.name}{_labels(pairs)} {number(value)}\n")


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...],
                 labelnames: tuple[str, ...] = ()) -> None:
        self.name = name
        self.help = help_text
        self.bounds = [float(b) for b in buckets]
        self.labelnames = labelnames
        # per label values: a count per bucket (the last one +Inf), and the sum
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        if not labelnames:
            self._child(())

    def _child(self, labels: tuple[str, ...]) -> tuple[list[int], list[float]]:
        child = self.series.get(labels)
        if child is None:
            child = self.series[labels] = ([0] * (len(self.bounds) + 1), [0.0])
        return child

    def observe(self, value: float, *labels: str) -> None:
        counts, total = self._child(labels)
        counts[bisect_left(self.bounds, value)] += 1
        total[0] += value

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}\n# TYPE {self.name} histogram\n")
        for labels, (counts, total) in self.series.items():
            pairs = tuple(zip(self.labelnames, labels, strict=True))
            running = 0
            for bound, count in zip([*self.bounds, math.inf], counts, strict=True):
                running += count
                le = _labels((*pairs, ("le", number(bound))))
                out.append(f"{self.name}_bucket{le} {number(running)}\n")
            out.append(f"{self.name}_count{_labels(pairs)} {number(running)}\n")
            out.append(f"{self.name}_sum{_labels(pairs)} {number(total[0])}\n")


def _gauge(out: list[str], name: str, help_text: str, kind: str, samples: list[tuple[Labels, float]]) -> None:
    out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
    out.extend(f"{name}{_labels(labels)} {number(value)}\n" for labels, value in samples)


class Metrics:
    def __init__(self, live: Live) -> None:
        self.live = live
        self.requests = Counter("vllm_gateway_requests", "Requests answered, by route and status",
                                ("route", "status"))
        self.broken = Counter("vllm_gateway_requests_broken",
                              "Requests that ended without their whole answer, by route and outcome "
                              "(client_gone, engine_gone, stopped, timeout, error, cancelled)",
                              ("route", "outcome"))
        self.duration = Histogram("vllm_gateway_request_duration_seconds", "Time to answer a request",
                                  REQUEST_BUCKETS_S, ("route",))
        self.cold_starts = Histogram("vllm_gateway_cold_start_seconds",
                                     "Engine cold starts: from the start to its first healthy answer",
                                     COLD_START_BUCKETS_S, ("engine",))
        self.start_failures = Counter("vllm_gateway_start_failures", "Engine starts that failed",
                                      ("engine",))
        self.wakes = Histogram("vllm_gateway_wake_seconds", "Engine wakes from sleep", WAKE_BUCKETS_S,
                               ("engine",))
        self.sleeps = Counter("vllm_gateway_sleeps", "Times the engine was put to sleep", ("engine",))
        self.stops = Counter("vllm_gateway_stops",
                             "Engine stops by cause (idle, manual, failure, external, evicted, yield)",
                             ("engine", "cause"))
        self.swaps = Counter("vllm_gateway_swaps", "Engines swapped in after others made room on the GPU",
                             ("engine",))
        self.tool_calls = Counter("vllm_gateway_tool_calls_rewritten",
                                  "Tool calls written as text and rewritten into tool_calls")
        self._all: list[Counter | Histogram] = [
            self.requests, self.broken, self.duration, self.cold_starts, self.start_failures, self.wakes,
            self.sleeps,
            self.stops, self.swaps, self.tool_calls,
        ]

    def engine_event(self, engine: str, event: EngineEvent) -> None:
        """The engines' callback."""
        match event:
            case ColdStart(seconds):
                self.cold_starts.observe(seconds, engine)
            case Wake(seconds):
                self.wakes.observe(seconds, engine)
            case Sleep():
                self.sleeps.inc(1.0, engine)
            case Stop(cause):
                self.stops.inc(1.0, engine, cause)
            case StartFailure():
                self.start_failures.inc(1.0, engine)
            case Swap():
                self.swaps.inc(1.0, engine)
            case _:
                assert_never(event)

    def request(self, route: str, status: int, seconds: float, tool_calls: int,
                outcome: str = "complete") -> None:
        self.requests.inc(1.0, route, str(status))
        if outcome != "complete":
            self.broken.inc(1.0, route, outcome)
        self.duration.observe(seconds, route)
        if tool_calls:
            self.tool_calls.inc(tool_calls)

    def render(self) -> bytes:
        out: list[str] = []
        for metric in self._all:
            metric.render(out)
        engines = self.live.engines()
        _gauge(out, "vllm_gateway_engine_state", "The engine's state (1 for the current one)", "gauge",
               [((("engine", e.name), ("state", s.value)), 1.0 if s is e.state else 0.0)
                for e in engines for s in State])
        _gauge(out, "vllm_gateway_requests_in_flight", "Engine requests being served or waiting", "gauge",
               [((("engine", e.name),), e.in_flight) for e in engines])
        _gauge(out, "vllm_gateway_requests_waiting",
               "Requests waiting for the engine to start, wake or fit on the GPU", "gauge",
               [((("engine", e.name),), e.waiting) for e in engines])
        _gauge(out, "vllm_gateway_engine_state_seconds_total", "Time the engine spent in each state",
               "counter", [((("engine", e.name), ("state", s.value)), seconds)
                           for e in engines for s, seconds in e.state_seconds.items()])
        self._gpus(out)
        return "".join(out).encode()

    def _gpus(self, out: list[str]) -> None:
        """Each GPU's memory and what each engine was measured to hold; left
        out entirely where no GPU is known (no probe)."""
        gpus = self.live.gpus()
        if not gpus:
            return
        for kind in ("total", "free"):
            _gauge(out, f"vllm_gateway_gpu_memory_{kind}_bytes", f"Each GPU's {kind} memory, last read",
                   "gauge", [((("gpu", str(g.index)),), value) for g in gpus
                             if (value := g.total if kind == "total" else g.free) is not None])
        _gauge(out, "vllm_gateway_engine_gpu_memory_bytes",
               "GPU memory an engine holds, measured: now, and kept figures awake and asleep", "gauge",
               [((("engine", h.engine), ("gpu", str(h.gpu)), ("measure", h.measure)), h.bytes)
                for h in self.live.held()])


def accumulate(seconds: dict[State, float], state: State, since: float) -> dict[State, float]:
    """Time per state including the current, unfinished stretch."""
    out = dict(seconds)
    out[state] = out.get(state, 0.0) + max(0.0, time.time() - since)
    return out


def merge_expositions(texts: Sequence[bytes]) -> bytes:
    """Several engines' /metrics as one valid exposition: the samples of a
    family stay together under one HELP and TYPE (each engine labels its
    own samples with its model name)."""
    families: dict[bytes, list[bytes]] = {}
    for text in texts:
        name = b""
        for line in text.splitlines():
            if line.startswith((b"# HELP ", b"# TYPE ")):
                name = line.split(b" ", 3)[2]
                lines = families.setdefault(name, [])
                if line not in lines:
                    lines.append(line)
            elif line and not line.startswith(b"#"):
                families.setdefault(name, []).append(line)
    return b"".join(line + b"\n" for lines in families.values() for line in lines)
