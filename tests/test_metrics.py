"""The hand-written exposition in shim/metrics.py against prometheus_client's
own rendering of the same metrics (the implementation it replaced)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shim.events import ColdStart, EngineEvent, Sleep, StartFailure, Stop, Swap, Wake
from shim.lifecycle import State
from shim.metrics import EngineLive, Live, Metrics, number

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import (  # noqa: E402
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: E402
from prometheus_client.utils import floatToGoString  # noqa: E402

from shim.metrics import COLD_START_BUCKETS_S, REQUEST_BUCKETS_S, WAKE_BUCKETS_S  # noqa: E402


class _Reference:
    """shim/metrics.py as it was, on prometheus_client."""

    def __init__(self, live: Live) -> None:
        disable_created_metrics()
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("vllm_gateway_requests", "Requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.broken = Counter("vllm_gateway_requests_broken",
                              "Requests that ended without their whole answer, by route and outcome "
                              "(client_gone, engine_gone, stopped, timeout, error, cancelled)",
                              ["route", "outcome"], registry=r)
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
        live_ = live

        class _Live:
            def collect(self):  # type: ignore[no-untyped-def]
                engines = live_.engines()
                g = GaugeMetricFamily("vllm_gateway_engine_state",
                                      "The engine's state (1 for the current one)",
                                      labels=["engine", "state"])
                f = GaugeMetricFamily("vllm_gateway_requests_in_flight",
                                      "Engine requests being served or waiting", labels=["engine"])
                w = GaugeMetricFamily("vllm_gateway_requests_waiting",
                                      "Requests waiting for the engine to start, wake or fit on the GPU",
                                      labels=["engine"])
                c = CounterMetricFamily("vllm_gateway_engine_state_seconds",
                                        "Time the engine spent in each state", labels=["engine", "state"])
                for e in engines:
                    for s in State:
                        g.add_metric([e.name, s.value], 1.0 if s is e.state else 0.0)
                    f.add_metric([e.name], e.in_flight)
                    w.add_metric([e.name], e.waiting)
                    for s, seconds in e.state_seconds.items():
                        c.add_metric([e.name, s.value], seconds)
                yield from (g, f, w, c)

        r.register(_Live())  # type: ignore[arg-type]

    def engine_event(self, engine: str, event: EngineEvent) -> None:
        match event:
            case ColdStart(seconds):
                self.cold_starts.labels(engine).observe(seconds)
            case Wake(seconds):
                self.wakes.labels(engine).observe(seconds)
            case Sleep():
                self.sleeps.labels(engine).inc()
            case Stop(cause):
                self.stops.labels(engine, cause).inc()
            case StartFailure():
                self.start_failures.labels(engine).inc()
            case Swap():
                self.swaps.labels(engine).inc()

    def request(self, route: str, status: int, seconds: float, tool_calls: int,
                outcome: str = "complete") -> None:
        self.requests.labels(route, str(status)).inc()
        if outcome != "complete":
            self.broken.labels(route, outcome).inc()
        self.duration.labels(route).observe(seconds)
        if tool_calls:
            self.tool_calls.inc(tool_calls)

    def render(self) -> bytes:
        return generate_latest(self.registry)


seconds = st.floats(min_value=0, max_value=1e4, allow_nan=False)
events = st.one_of(
    st.tuples(st.just("request"), st.sampled_from(["/v1/chat/completions", "other", 'a"b\\c\nd']),
              st.sampled_from([200, 400, 404, 502]), seconds, st.integers(0, 3),
              st.sampled_from(["complete", "client_gone", "stopped"])),
    st.tuples(st.just("engine"),
              st.one_of(st.builds(ColdStart, seconds), st.builds(Wake, seconds), st.just(Sleep()),
                        st.just(StartFailure()), st.just(Swap()),
                        st.builds(Stop, st.sampled_from(["idle", "manual", "hung"]))),
              st.sampled_from(["main", "coder", "b"])),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=30), st.sampled_from(list(State)), st.integers(0, 5),
       st.dictionaries(st.sampled_from(list(State)), seconds, max_size=3))
def test_same_text_as_prometheus_client(evs: list[tuple[object, ...]], state: State, in_flight: int,
                                        state_seconds: dict[State, float]) -> None:
    live = Live(lambda: [EngineLive("main", state, in_flight, 1, state_seconds),
                         EngineLive("coder", State.STOPPED, 0, 0, {})])
    ours, theirs = Metrics(live), _Reference(live)
    for ev in evs:
        for m in (ours, theirs):
            if ev[0] == "request":
                m.request(*ev[1:])  # type: ignore[arg-type]
            else:
                m.engine_event(ev[2], ev[1])  # type: ignore[arg-type]
    assert ours.render().decode() == theirs.render().decode()


@given(st.floats(allow_nan=True))
def test_numbers_like_prometheus_client(x: float) -> None:
    assert number(x) == floatToGoString(x)
