"""The sleep tier end to end: the idle check puts the engine to sleep through
the shim, requests wake it, and no request ever reaches a sleeping engine."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gatewaying import Gateway, wait_until
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

GENERATION = ("/v1/chat/completions", "/v1/completions")


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    yield Gateway(sandbox, timer_every_s=1)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "engine-requests.jsonl"


def engine_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fake(log: Path, *extra: str) -> list[str]:
    return ["--startup-delay", "1", "--sleep-delay-s", "0.3", "--wake-delay-s", "0.2",
            "--log-requests", str(log), *extra]


def assert_no_generation_while_asleep(log: Path) -> None:
    bad = [r for r in engine_log(log) if r["path"] in GENERATION and r["sleeping"]]
    assert not bad, f"the engine received generations while asleep: {bad[:3]}"


def test_idle_engine_sleeps_and_a_request_wakes_it(gw: Gateway, log: Path) -> None:
    gw.configure(fake(log), sleep_after="2s", stop_after="10m")
    assert gw.chat()[0] == 200
    engine_pid = gw.unit_prop("vllm.service", "MainPID")
    wait_until(lambda: gw.status()["state"] == "sleeping", 30, "the idle check to put the engine to sleep")
    assert "state=sleeping" in gw.unit_prop("vllm-gateway.service", "StatusText")
    assert gw.unit_prop("vllm.service", "MainPID") == engine_pid  # asleep, not stopped
    sleeps = [r for r in engine_log(log) if r["path"] == "/sleep"]
    assert sleeps and sleeps[0]["query"] == {"level": ["1"]}
    # the idle check asked, and the engine decided on its own idle time
    assert "putting engine main to sleep at level 1 (idle)" in gw.journal("vllm-gateway")
    # scraping models while asleep never reaches the engine
    code, _, body = gw.request("GET", "/v1/models")
    assert code == 200 and b"tiny" in body
    code, headers, _ = gw.chat()
    assert code == 200
    assert "x-vllm-gateway-cold-start-ms" in headers  # it waited for the wake
    st = gw.status()
    assert st["state"] == "ready" and st["last_wake_s"] is not None
    paths = [r["path"] for r in engine_log(log)]
    assert "/wake_up" in paths and "/is_sleeping" in paths
    assert gw.unit_prop("vllm.service", "MainPID") == engine_pid
    assert_no_generation_while_asleep(log)


def test_requests_at_every_moment_of_the_cycle_are_answered(gw: Gateway, log: Path) -> None:
    gw.configure(fake(log, "--token-interval-ms", "2"), sleep_after="1s", stop_after="10m")
    assert gw.chat()[0] == 200
    # idle 1 s, then the 1 s timer: the sleep call (0.3 s) starts 1-2 s after
    # the last request. Bursts land before it, during it, and after it.
    pauses = [3.0, 1.1, 1.3, 1.5, 1.7, 1.9, 2.1, 0.2, 3.0]
    results: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        code = gw.chat()[0]
        with lock:
            results.append(code)

    for pause in pauses:
        time.sleep(pause)
        burst = [threading.Thread(target=one) for _ in range(3)]
        for t in burst:
            t.start()
        for t in burst:
            t.join()
    assert results == [200] * (3 * len(pauses))
    sleeps = sum(1 for r in engine_log(log) if r["path"] == "/sleep")
    wakes = sum(1 for r in engine_log(log) if r["path"] == "/wake_up")
    print(f"\ncycle test: {len(results)} requests answered across {sleeps} sleeps and {wakes} wakes")
    assert sleeps >= 2 and wakes >= 2
    assert_no_generation_while_asleep(log)


def test_level_2_is_woken_with_the_full_sequence(gw: Gateway, log: Path) -> None:
    gw.configure(fake(log), sleep_after="10m", sleep_level=2, stop_after="10m")
    assert gw.chat()[0] == 200
    code, _, body = gw.request("POST", "/gateway/sleep")
    assert code == 200, body
    assert json.loads(body)["state"] == "sleeping"
    assert [r["query"] for r in engine_log(log) if r["path"] == "/sleep"] == [{"level": ["2"]}]
    start = len(engine_log(log))
    assert gw.chat()[0] == 200
    seq = [(r["path"], r["query"], (r["body"] or {}).get("method")) for r in engine_log(log)[start:]]
    control = [s for s in seq if s[0] not in GENERATION]
    assert control[:4] == [
        ("/wake_up", {"tags": ["weights"]}, None),
        ("/collective_rpc", {}, "reload_weights"),
        ("/wake_up", {"tags": ["kv_cache"]}, None),
        ("/reset_prefix_cache", {}, None),
    ]
    assert control[4][0] == "/is_sleeping"
    assert_no_generation_while_asleep(log)


def test_a_failed_wake_falls_back_to_a_cold_start(gw: Gateway, log: Path) -> None:
    gw.configure(fake(log, "--fail-wake"), sleep_after="10m", stop_after="10m")
    assert gw.chat()[0] == 200
    first_pid = gw.unit_prop("vllm.service", "MainPID")
    assert gw.request("POST", "/gateway/sleep")[0] == 200
    code, _, body = gw.chat()
    assert code == 200, body  # answered, only later
    assert gw.unit_prop("vllm.service", "MainPID") != first_pid
    assert "failed to wake" in gw.journal("vllm-gateway")
    assert_no_generation_while_asleep(log)


def test_the_stop_tier_follows_the_sleep_tier(gw: Gateway, log: Path) -> None:
    gw.configure(fake(log), sleep_after="1s", stop_after="5s", stop_timeout="2s")
    assert gw.chat()[0] == 200
    wait_until(lambda: gw.status()["state"] == "sleeping", 30, "sleep")
    wait_until(lambda: gw.active("vllm.service") == "inactive", 30, "the stop after sleeping")
    assert gw.status()["state"] == "stopped"


def test_an_engine_that_cannot_sleep_falls_back_to_the_stop_tier_without_looping(
    gw: Gateway, log: Path
) -> None:
    gw.configure(fake(log, "--no-sleep-support"), sleep_after="1s", stop_after="6s", stop_timeout="2s")
    code, _, body = gw.chat()
    assert code == 200, body
    st = gw.status()
    assert st["sleep_enabled"] is False and "not supported" in st["last_sleep_error"]
    # the engine was restarted once, without sleep mode
    assert gw.journal("vllm-gateway").count("refused sleep mode") == 1
    wait_until(lambda: gw.active("vllm.service") == "inactive", 30, "the stop tier")
    assert gw.journal("vllm-gateway").count("refused sleep mode") == 1
    assert not [r for r in engine_log(log) if r["path"] == "/sleep"]
    code, _, body = gw.request("POST", "/gateway/sleep")
    assert code == 409 and b"cannot sleep" in body


def wait_for_an_idle_check(gw: Gateway) -> None:
    """Until the idle timer has run the check once more, and it ended."""
    last = gw.unit_prop("vllm-gateway-idle.timer", "LastTriggerUSecMonotonic")

    def ran() -> bool:
        return (gw.unit_prop("vllm-gateway-idle.timer", "LastTriggerUSecMonotonic") != last
                and gw.active("vllm-gateway-idle.service") != "activating")

    wait_until(ran, 30, "an idle check")


def test_a_refused_sleep_mode_is_remembered_across_a_shim_restart(gw: Gateway, log: Path) -> None:
    gw.configure(fake(log, "--no-sleep-support"), sleep_after="1s", stop_after="off", stop_timeout="2s")
    refusals = gw.journal("vllm-gateway").count("refused sleep mode")
    asked = gw.journal("vllm-gateway-idle").count("asking the gateway to put")
    t0 = time.monotonic()
    code, headers, body = gw.chat()
    waited_ms = (time.monotonic() - t0) * 1000
    assert code == 200, body
    st = gw.status()
    # the cold start reported is what the client waited: both starts
    cold_ms = int(headers["x-vllm-gateway-cold-start-ms"])
    assert abs(st["last_cold_start_s"] * 1000 - cold_ms) < 50 and cold_ms <= waited_ms + 50
    assert st["sleep_refused"] == "Sleep mode is not supported on current platform."
    assert st["last_error"] == "sleep mode refused: Sleep mode is not supported on current platform."
    assert st["last_error_past"] is True and st["last_error_at"] > 0
    assert "sleep=no" in gw.unit_prop("vllm-gateway.service", "StatusText")
    # the idle timer runs every second: two of its checks later, it asked for no sleep
    for _ in range(2):
        wait_for_an_idle_check(gw)
    assert gw.journal("vllm-gateway-idle").count("asking the gateway to put") == asked
    assert not [r for r in engine_log(log) if r["path"] == "/sleep"]

    # a new shim knows it: the next cold start tries no sleep mode
    gw.sb.systemctl("stop", "vllm-gateway.service", "vllm.service")
    assert gw.chat()[0] == 200
    assert gw.journal("vllm-gateway").count("refused sleep mode") == refusals + 1
    st = gw.status()
    assert st["sleep_enabled"] is False
    assert st["sleep_refused"] == "Sleep mode is not supported on current platform."
    assert st["last_error"] is None  # nothing went wrong in this shim's life
    started = [line for line in gw.journal("vllm-gateway").splitlines() if "starting engine main" in line]
    assert "--enable-sleep-mode" not in started[-1]


@pytest.mark.parametrize("path", [
    "/sleep?level=2", "/SLEEP", "/sleep/", "//sleep", "/%73leep", "/wake_up", "/Wake_Up/",
    "/collective_rpc", "/%2563ollective_rpc", "/reset_prefix_cache", "/is_sleeping",
    "/reconfigure", "/v1/../sleep", "/./wake_up",
])
def test_dev_endpoints_are_unreachable_through_the_public_port(gw: Gateway, path: str) -> None:
    for method in ("POST", "GET", "PUT"):
        code, _, _ = gw.request(method, path, b"{}")
        assert code == 404, (method, path)
