"""How scripts/bench makes one reading of several paced windows: medians of
the figures, the largest delay, errors and stalls summed, and each
window's delay p99 kept for the report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

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


def test_the_delay_target_names_each_window_and_the_floor_ignores_them() -> None:
    g = run.combine_windows(256, [window(2.0, 20.0, 9.0, 0), window(7.5, 30.0, 40.0, 0),
                                  window(3.0, 21.0, 8.0, 0)])
    first = run.combine_windows(256, [window(1.0, 0, 5.0, 0), window(1.4, 0, 5.0, 0), window(0.9, 0, 5.0, 0)])
    again = run.combine_windows(256, [window(0.8, 0, 5.0, 0), window(1.2, 0, 5.0, 0), window(1.1, 0, 5.0, 0)])
    direct = run.lower_floor(first, again)
    assert direct["p256_delay_p99_ms"] == 1.0  # the lower of the two medians
    assert not run._windows(direct, 256)
    rows = run.paced_targets({"vllm-gateway": g, "direct": direct})
    row = next(r for r in rows if r[0] == "delay added p99 @256 paced streams (rewrite off)")
    assert row[2] == "2.00 ms (3.00 less direct's 1.00; windows 2.00 / 7.50 / 3.00)"
    assert row[3] is True
