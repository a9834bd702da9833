"""A daemon-reload, a daemon-reexec or an upgrade (scripts/install) while the
engine runs, sleeps or starts: the shim keeps track of it, never calls it
stopped while its unit is active, and the idle stop still comes on time.

A reload unloads and loads every unit again, and systemd says UnitRemoved
for each: the shim must not take that for the engine's end (the GPU would
then stay held for good, the idle check asking a shim that thinks it has
nothing to stop)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests.gatewaying import REPO, VENV, Gateway, wait_until
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

# The idle stop comes at stop_after plus one timer period (1 s here); a
# loaded machine adds seconds to each step.
STOP_AFTER_S = 6
IDLE_STOP_WAIT_S = 60


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    yield Gateway(sandbox, timer_every_s=1)


def act(gw: Gateway, action: str) -> None:
    if action == "reload":
        gw.sb.systemctl("daemon-reload")
    elif action == "reexec":
        gw.sb.systemctl("daemon-reexec")
    else:  # the documented upgrade: install again over the running gateway
        gw.sb.run([str(REPO / "scripts" / "install"), "--venv", str(VENV), "--no-pip"], timeout=300)


def assert_kept_then_stopped_on_time(gw: Gateway, engine_pid: str, *, waits: bool = False) -> None:
    """The same engine is served (the same process: not started again; without
    a wait, unless it sleeps or a new shim adopts it), then the idle stop comes."""
    code, headers, _ = gw.chat()
    assert code == 200
    if not waits:
        assert "x-vllm-gateway-cold-start-ms" not in headers, "the engine was started again"
    assert gw.unit_prop("vllm.service", "MainPID") == engine_pid
    wait_until(lambda: gw.active("vllm.service") == "inactive", IDLE_STOP_WAIT_S,
               "the idle stop after the reload")
    wait_until(lambda: gw.status()["state"] == "stopped", 30, "the shim to see the stop")
    shim_log = gw.journal("vllm-gateway")
    assert "stopped unexpectedly" not in shim_log, shim_log[-3000:]
    # the shim's own view never had to be corrected from the unit's
    assert "the unit's state wins" not in shim_log, shim_log[-3000:]


@pytest.mark.parametrize("action", ["reload", "reexec", "upgrade"])
def test_a_ready_engine_is_kept_and_stopped_when_idle(gw: Gateway, action: str) -> None:
    gw.configure(["--startup-delay", "1"], stop_after=f"{STOP_AFTER_S}s", stop_timeout="5s")
    code, headers, _ = gw.chat()
    assert code == 200 and "x-vllm-gateway-cold-start-ms" in headers
    engine_pid = gw.unit_prop("vllm.service", "MainPID")
    act(gw, action)
    assert gw.active("vllm.service") == "active"
    assert_kept_then_stopped_on_time(gw, engine_pid, waits=action == "upgrade")


@pytest.mark.parametrize("action", ["reload", "reexec", "upgrade"])
def test_a_sleeping_engine_is_kept_and_stopped_when_idle(gw: Gateway, action: str) -> None:
    gw.configure(["--startup-delay", "1", "--sleep-delay-s", "0.2", "--wake-delay-s", "0.1"],
                 sleep_after="1s", stop_after=f"{STOP_AFTER_S + 4}s", stop_timeout="5s")
    assert gw.chat()[0] == 200
    engine_pid = gw.unit_prop("vllm.service", "MainPID")
    wait_until(lambda: gw.status()["state"] == "sleeping", 30, "the engine to fall asleep")
    act(gw, action)
    assert gw.active("vllm.service") == "active"
    assert_kept_then_stopped_on_time(gw, engine_pid, waits=True)


@pytest.mark.parametrize("action", ["reload", "reexec"])
def test_a_starting_engine_is_kept_and_its_request_answered(gw: Gateway, action: str) -> None:
    gw.configure(["--startup-delay", "4"], stop_after=f"{STOP_AFTER_S}s", stop_timeout="5s")
    answers: list[int] = []
    client = threading.Thread(target=lambda: answers.append(gw.chat()[0]))
    client.start()
    try:
        wait_until(lambda: gw.status()["state"] == "starting", 30, "the engine to start")
        act(gw, action)
    finally:
        client.join()
    assert answers == [200]
    assert_kept_then_stopped_on_time(gw, gw.unit_prop("vllm.service", "MainPID"))
