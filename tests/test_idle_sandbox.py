"""The idle timer stops the engine, processes and all, and a stop that races
requests loses none of them. The timer runs only while an engine runs: it
stops the engine even with the shim gone, and with every engine stopped
nothing of the gateway runs or fires."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import pytest

from tests.gatewaying import Gateway, wait_until
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

TIMER = "vllm-gateway-idle.timer"


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    g = Gateway(sandbox, timer_every_s=1)
    # orphan workers ignore SIGTERM and leave their parent's session: only the
    # unit's control-group kill removes them, as with vLLM's engine processes
    g.configure(["--startup-delay", "1", "--workers", "2", "--orphan-workers"],
                stop_after="3s", stop_timeout="2s")
    yield g


def worker_pids(gw: Gateway) -> list[int]:
    return [int(p) for p in re.findall(r"Started engine process \S+ pid=(\d+)", gw.journal("vllm"))]


def test_idle_timer_stops_the_engine_and_every_process_of_its_cgroup(gw: Gateway) -> None:
    assert gw.chat()[0] == 200
    main_pid = int(gw.unit_prop("vllm.service", "MainPID"))
    workers = worker_pids(gw)
    assert len(workers) == 2 and all(gw.alive_in_sandbox(p) for p in [main_pid, *workers])
    wait_until(lambda: gw.active("vllm.service") == "inactive", 40, "the idle timer to stop the engine")
    for pid in [main_pid, *workers]:
        assert not gw.alive_in_sandbox(pid), f"process {pid} of the engine outlived its unit"
    assert "stopping vllm.service: idle" in gw.journal("vllm-gateway-idle")
    wait_until(lambda: gw.status()["state"] == "stopped", 30, "the shim to see the stop")
    # no engine wants the timer any more: systemd stopped it
    wait_until(lambda: gw.active(TIMER) == "inactive", 30, "systemd to stop the unneeded timer")


def test_next_request_starts_the_engine_again(gw: Gateway) -> None:
    wait_until(lambda: gw.active("vllm.service") == "inactive", 40, "the engine to be stopped")
    code, headers, _ = gw.chat()
    assert code == 200
    assert "x-vllm-gateway-cold-start-ms" in headers
    assert gw.active("vllm.service") == "active"
    assert gw.active(TIMER) == "active"  # pulled in by the engine's unit


def test_the_timer_stops_an_engine_whose_shim_is_gone(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1"], stop_after="3s", stop_timeout="2s")
    assert gw.chat()[0] == 200
    assert gw.active(TIMER) == "active"
    stops_before = gw.journal("vllm-gateway-idle").count("stopping vllm.service: idle")
    # the engine outlives its shim (a new shim would adopt it); nobody connects
    gw.sb.systemctl("stop", "vllm-gateway.service")
    assert gw.active("vllm.service") == "active"
    wait_until(lambda: gw.active("vllm.service") == "inactive", 40, "the idle timer to stop the engine")
    assert gw.journal("vllm-gateway-idle").count("stopping vllm.service: idle") == stops_before + 1
    wait_until(lambda: gw.active(TIMER) == "inactive", 30, "systemd to stop the unneeded timer")
    assert gw.active("vllm-gateway.service") == "inactive"


def test_engine_is_kept_while_a_request_is_in_flight(gw: Gateway) -> None:
    # a stream lasting longer than stop_after plus a timer period
    reply = "word " * 120  # 120 tokens at 50 ms: ~6 s, past the 3 s threshold
    gw.configure(["--startup-delay", "1", "--token-interval-ms", "50"], stop_after="3s", stop_timeout="2s")
    code, _, body = gw.chat(stream=True, fake_reply=reply)
    assert code == 200
    assert body.rstrip().endswith(b"data: [DONE]")
    assert b'"finish_reason":"stop"' in body.replace(b" ", b"")


def test_a_stop_racing_requests_loses_none(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1", "--token-interval-ms", "5"], stop_after="10m")
    assert gw.chat()[0] == 200
    results: list[int] = []
    lock = threading.Lock()
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            code = gw.chat()[0]
            with lock:
                results.append(code)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):  # stop the engine under the clients' feet
            wait_until(lambda: gw.active("vllm.service") == "active", 30, "the engine to be back")
            served = len(results)
            wait_until(lambda n=served: len(results) > n + 8, 30, "clients to be served")
            gw.sb.systemctl("stop", "vllm.service")
    finally:
        done.set()
        for t in threads:
            t.join()
    assert set(results) == {200}, sorted(set(results))
    assert gw.journal("vllm-gateway").count("starting engine main") >= 3


def test_shim_exits_when_idle_and_the_socket_starts_it_again(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1"], gateway={"exit_after": "2s"}, stop_after="2s",
                 stop_timeout="2s")
    assert gw.chat()[0] == 200
    # the timer stops the engine, then the shim leaves: nothing but systemd
    # runs, and no timer of the gateway is left to fire; the socket listens
    wait_until(lambda: gw.active("vllm.service") == "inactive", 40, "the engine's idle stop")
    wait_until(lambda: gw.active("vllm-gateway.service") == "inactive", 40, "the shim's exit")
    assert gw.unit_prop("vllm-gateway.service", "Result") == "success"
    wait_until(lambda: gw.active(TIMER) == "inactive", 30, "systemd to stop the unneeded timer")
    assert gw.unit_prop(TIMER, "NextElapseUSecMonotonic") in ("", "0", "infinity")
    running = gw.sb.systemctl("list-units", "--state=active", "--plain", "--no-legend", "vllm*").stdout
    assert [line.split()[0] for line in running.splitlines()] == ["vllm-gateway.socket"], running
    code, _, _ = gw.request("GET", "/health")
    assert code == 200
    assert gw.active("vllm-gateway.service") == "active"
