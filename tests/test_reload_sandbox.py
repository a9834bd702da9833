"""A daemon-reload, a daemon-reexec or an upgrade (scripts/install) while the
engine runs, sleeps or starts: the shim keeps track of it, never calls it
stopped while its unit is active, and the idle stop still comes on time.

A reload unloads and loads every unit again, and systemd says UnitRemoved
for each: the shim must not take that for the engine's end (the GPU would
then stay held for good, the idle check asking a shim that thinks it has
nothing to stop)."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.gatewaying import CONFIG, REPO, VENV, Gateway, wait_until
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


@pytest.mark.parametrize("action", ["reload", "reexec", "upgrade"])
def test_a_starting_engine_is_kept_and_its_request_answered(gw: Gateway, action: str) -> None:
    gw.configure(["--startup-delay", "4"], stop_after=f"{STOP_AFTER_S}s", stop_timeout="5s")
    answers: list[object] = []

    def client() -> None:
        try:
            answers.append(gw.chat()[0])
        except (OSError, http.client.HTTPException) as e:
            answers.append(e)

    waiting = threading.Thread(target=client)
    waiting.start()
    try:
        wait_until(lambda: gw.status()["state"] == "starting", 30, "the engine to start")
        pid = gw.unit_prop("vllm.service", "MainPID")
        act(gw, action)
    finally:
        waiting.join()
    if action == "upgrade":
        # the old shim's connections end with it (documented); the new shim
        # adopts the engine that was starting instead of starting another
        assert len(answers) == 1
    else:
        assert answers == [200]
    assert_kept_then_stopped_on_time(gw, pid, waits=action == "upgrade")


# ---- configuration changes without a restart ----

def cli(gw: Gateway, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return gw.sb.run([f"{gw.home}/.local/bin/vllm-gateway", *args], check=check)


def rewrite_config(gw: Gateway, old: str, new: str) -> None:
    path = CONFIG.replace("~", gw.home)
    text = gw.sb.run(["cat", path]).stdout
    assert old in text, text
    gw.sb.write_file(path, text.replace(old, new))


def test_a_reload_applies_thresholds_at_once_and_refuses_a_bad_file(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1"], stop_after="10m", stop_timeout="5s")
    assert gw.chat()[0] == 200
    pid = gw.status()["gateway_pid"]
    rewrite_config(gw, 'stop_after = "10m"', 'stop_after = "9m"')
    assert "engines.main.stop_after_s: 600.0 -> 540.0" in cli(gw, "config", "check").stdout
    gw.sb.systemctl("reload", "vllm-gateway.service")
    status = gw.status()
    assert status["stop_after_s"] == 540.0 and status["gateway_pid"] == pid  # no restart
    assert "reload: engines.main.stop_after_s: 600.0 -> 540.0" in gw.journal("vllm-gateway")
    assert "the running gateway uses this configuration" in cli(gw, "config", "check").stdout

    # a bad file is refused, saying why, and what runs stays
    rewrite_config(gw, 'stop_after = "9m"', 'stop_after = "soon"')
    refused = cli(gw, "reload", check=False)
    assert refused.returncode == 1 and "engines.main.stop_after" in refused.stderr, refused.stderr
    assert gw.sb.systemctl("reload", "vllm-gateway.service", check=False).returncode != 0
    assert gw.status()["stop_after_s"] == 540.0
    assert "reload refused" in gw.journal("vllm-gateway")

    # SIGHUP reloads too
    rewrite_config(gw, 'stop_after = "soon"', 'stop_after = "8m"')
    gw.sb.run(["kill", "-HUP", str(pid)])
    wait_until(lambda: gw.status()["stop_after_s"] == 480.0, 30, "the reload on SIGHUP")

    # the threshold applies to the running engine: the idle stop comes
    rewrite_config(gw, 'stop_after = "8m"', f'stop_after = "{STOP_AFTER_S}s"')
    assert "reloaded: 1 change" in cli(gw, "reload").stdout
    wait_until(lambda: gw.active("vllm.service") == "inactive", IDLE_STOP_WAIT_S, "the new idle stop")
    assert gw.status()["gateway_pid"] == pid


def test_a_new_command_line_restarts_the_engine_when_idle_and_drops_no_request(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1", "--token-interval-ms", "5", "--reply-text", "old engine"],
                 stop_after="10m", stop_timeout="5s")
    assert gw.chat()[0] == 200
    first_pid = gw.unit_prop("vllm.service", "MainPID")
    results: list[tuple[int, bytes]] = []
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            code, _, body = gw.chat()
            results.append((code, body))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        wait_until(lambda: len(results) > 8, 60, "clients to be served")
        rewrite_config(gw, '"old engine"', '"new engine"')
        out = cli(gw, "reload").stdout
        assert "engine main runs its old command line until it is idle" in out, out
        served = len(results)
        wait_until(lambda: len(results) > served + 8, 60, "clients to be served after the reload")
    finally:
        done.set()
        for t in clients:
            t.join()
    assert {code for code, _ in results} == {200}
    # idle now: the engine is restarted with the new command line
    wait_until(lambda: gw.unit_prop("vllm.service", "MainPID") not in ("0", first_pid), 60,
               "the engine's restart with its new command line")
    wait_until(lambda: gw.status()["state"] == "ready", 60, "the restarted engine")
    assert b"new engine" in gw.chat()[2]
    assert "restarting engine main, idle, with its new command line" in gw.journal("vllm-gateway")


def test_restart_applies_a_new_command_line_at_once(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1", "--token-interval-ms", "50", "--reply-text", "before"],
                 stop_after="10m", stop_timeout="5s")
    holder = gw.connect()  # a stream in flight keeps the engine busy: no restart when idle
    holder.request("POST", "/v1/chat/completions", body=json.dumps({
        "model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}],
        "fake_reply": "x " * 400}), headers={"Content-Type": "application/json"})
    resp = holder.getresponse()
    assert resp.status == 200 and resp.read1(10)
    pid = gw.unit_prop("vllm.service", "MainPID")
    rewrite_config(gw, '"before"', '"after"')
    cli(gw, "reload")
    assert gw.status()["state"] == "ready" and gw.unit_prop("vllm.service", "MainPID") == pid
    assert b"before" in gw.chat()[2]  # busy: it runs the old command line meanwhile
    try:
        # the operator's restart does not wait for the stream
        assert "engine restarted" in cli(gw, "restart", "main").stdout
    finally:
        holder.close()
    assert gw.unit_prop("vllm.service", "MainPID") != pid
    assert b"after" in gw.chat()[2]
