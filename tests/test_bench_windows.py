"""How scripts/bench makes one reading of several paced windows: the
peers' windows interleaved in rounds; medians of the figures, the largest
max delay, errors and stalls summed, and each window's delay p99 kept for
the report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import run


def window(p99: float, cpu: float, dmax: float, stalls: int) -> dict[str, Any]:
    return {"events_per_s": 10000.0, "offered_per_s": 10240.0, "delay_p50_ms": 0.3, "delay_p99_ms": p99,
            "delay_max_ms": dmax, "errors": 0, "stalls": stalls, "cpu_us_per_event": cpu}


def test_windows_give_medians_the_largest_delay_and_sums() -> None:
    r = run.combine_windows(256, [window(2.0, 20.0, 9.0, 0), window(15.0, 30.0, 40.0, 2),
                                  window(3.0, 21.0, 8.0, 1)])
    assert r["p256_delay_p99_ms"] == 3.0  # the disturbed window does not set the reading
    assert r["p256_cpu_us_per_event"] == 21.0
    assert r["p256_delay_max_ms"] == 40.0  # but its worst event stays in sight
    assert r["p256_stalls"] == 3
    assert run._windows(r, 256) == [2.0, 15.0, 3.0]


def test_one_window_is_its_own_reading() -> None:
    r = run.combine_windows(64, [window(0.7, 18.0, 3.0, 0)])
    assert r["p64_delay_p99_ms"] == 0.7
    assert run._windows(r, 64) == []


def test_the_delay_target_names_each_window() -> None:
    g = run.combine_windows(256, [window(2.0, 20.0, 9.0, 0), window(7.5, 30.0, 40.0, 0),
                                  window(3.0, 21.0, 8.0, 0)])
    direct = run.combine_windows(256, [window(1.0, 0, 5.0, 0), window(1.4, 0, 5.0, 0),
                                       window(0.9, 0, 5.0, 0)])
    rows = run.paced_targets({"vllm-gateway": g, "direct": direct})
    row = next(r for r in rows if r[0] == "delay added p99 @256 paced streams (rewrite off)")
    assert row[2] == "2.00 ms (3.00 less direct's 1.00; windows 2.00 / 7.50 / 3.00)"
    assert row[3] is True


def test_rounds_interleave_the_peers_and_drop_one_that_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []
    p99 = iter(range(1, 100))

    def one_window(url: str, n: int, d: run.Durations, tools: bool, pid: int | None) -> dict[str, Any]:
        port = int(url.rsplit(":", 1)[1])
        calls.append(({1: "direct", 2: "proxyd", 3: "gateway"}[port], n))
        if port == 2 and len(calls) > 6:
            raise RuntimeError("the proxy broke")
        return window(float(next(p99)), 20.0 if port != 1 else 0, 5.0, 0)

    monkeypatch.setattr(run, "paced_window", one_window)
    monkeypatch.setattr(run, "settle", lambda limit_s: None)
    notes: list[str] = []
    d = run.Durations(chat32=0, chat1=0, stream64=0, stream1=0, warmup=0, cold_runs=0, idle_s=0,
                      paced=1, paced_warmup=0, paced_windows=3, settle_s=0)
    peers = [run.PacedPeer("direct", 1), run.PacedPeer("socket-proxyd", 2, pid=7),
             run.PacedPeer("vllm-gateway", 3, pid=8)]
    res = run.paced_rounds(peers, d, notes)
    # one window of each peer in turn, round after round, at 64 streams then 256
    assert calls[:6] == [("direct", 64), ("proxyd", 64), ("gateway", 64)] * 2
    assert calls[6:9] == [("direct", 64), ("proxyd", 64), ("gateway", 64)]
    assert calls[9:] == [("direct", 256), ("gateway", 256)] * 3  # the failed peer left the rounds
    assert set(res) == {"direct", "vllm-gateway"}
    assert notes == ["socket-proxyd: paced streams not measured: the proxy broke"]
    # each peer's own windows, in order: direct read 1, 4, 7 at 64 streams
    assert run._windows(res["direct"], 64) == [1.0, 4.0, 7.0]
    assert res["vllm-gateway"]["p64_delay_p99_ms"] == 6.0
    assert run._windows(res["vllm-gateway"], 256) == [10.0, 12.0, 14.0]
