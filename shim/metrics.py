"""Prometheus metrics of the gateway, in its own registry.

The engine and the server stay free of prometheus: the engine reports
events through a callback, and live values (state, in flight, time in each
state) are read at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .lifecycle import State

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# Cold starts run from seconds (a small model, warm caches) to many minutes.
COLD_START_BUCKETS_S = (2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)
WAKE_BUCKETS_S = (0.25, 0.5, 1, 2, 3, 5, 10, 20, 60)
REQUEST_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class EngineLive:
    """One engine's values at scrape time."""

    name: str
    state: State
    in_flight: int
    waiting: int
    state_seconds: dict[State, float]


class Live:
    """Values read at scrape time (provided by the server), one per engine."""

    def __init__(self, engines: Callable[[], list[EngineLive]]) -> None:
        self.engines = engines


class _LiveCollector(Collector):
    def __init__(self, live: Live) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        engines = self.live.engines()
        g = GaugeMetricFamily("vllm_gateway_engine_state", "The engine's state (1 for the current one)",
                              labels=["engine", "state"])
        f = GaugeMetricFamily("vllm_gateway_requests_in_flight", "Engine requests being served or waiting",
                              labels=["engine"])
        w = GaugeMetricFamily("vllm_gateway_requests_waiting",
                              "Requests waiting for the engine to start, wake or fit on the GPU",
                              labels=["engine"])
        c = CounterMetricFamily("vllm_gateway_engine_state_seconds", "Time the engine spent in each state",
                                labels=["engine", "state"])
        for e in engines:
            for s in State:
                g.add_metric([e.name, s.value], 1.0 if s is e.state else 0.0)
            f.add_metric([e.name], e.in_flight)
            w.add_metric([e.name], e.waiting)
            for s, seconds in e.state_seconds.items():
                c.add_metric([e.name, s.value], seconds)
        yield from (g, f, w, c)


class Metrics:
    def __init__(self, live: Live) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series are noise
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("vllm_gateway_requests", "Requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.duration = Histogram("vllm_gateway_request_duration_seconds", "Time to answer a request",
                                  ["route"], buckets=REQUEST_BUCKETS_S, registry=r)
        self.cold_starts = Histogram("vllm_gateway_cold_start_seconds",
                                     "Engine cold starts: from the start to its first healthy answer",
                                     ["engine"], buckets=COLD_START_BUCKETS_S, registry=r)
        self.start_failures = Counter("vllm_gateway_start_failures", "Engine starts that failed",
                                      ["engine"], registry=r)
        self.wakes = Histogram("vllm_gateway_wake_seconds", "Engine wakes from sleep",
                               ["engine"], buckets=WAKE_BUCKETS_S, registry=r)
        self.sleeps = Counter("vllm_gateway_sleeps", "Times the engine was put to sleep", ["engine"],
                              registry=r)
        self.stops = Counter("vllm_gateway_stops",
                             "Engine stops by cause (idle, manual, failure, external, evicted, yield)",
                             ["engine", "cause"], registry=r)
        self.swaps = Counter("vllm_gateway_swaps", "Engines swapped in after others made room on the GPU",
                             ["engine"], registry=r)
        self.tool_calls = Counter("vllm_gateway_tool_calls_rewritten",
                                  "Tool calls written as text and rewritten into tool_calls", registry=r)
        r.register(_LiveCollector(live))

    def engine_event(self, engine: str, kind: str, value: float, label: str) -> None:
        """The engines' callback: ("cold_start", s), ("wake", s), ("sleep"), ("stop", cause), ..."""
        if kind == "cold_start":
            self.cold_starts.labels(engine).observe(value)
        elif kind == "wake":
            self.wakes.labels(engine).observe(value)
        elif kind == "sleep":
            self.sleeps.labels(engine).inc()
        elif kind == "stop":
            self.stops.labels(engine, label).inc()
        elif kind == "start_failure":
            self.start_failures.labels(engine).inc()
        elif kind == "swap":
            self.swaps.labels(engine).inc()

    def request(self, route: str, status: int, seconds: float, tool_calls: int) -> None:
        self.requests.labels(route, str(status)).inc()
        self.duration.labels(route).observe(seconds)
        if tool_calls:
            self.tool_calls.inc(tool_calls)

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
