"""The installed `vllm-gateway` command, run inside the sandbox like a user
would: status in every engine state, manual control, and the journal."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator

import pytest

from shim.commands import STATUS_KEYS
from tests.gatewaying import VENV, Gateway, wait_until
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

COMMAND = str(VENV / "bin" / "vllm-gateway")
# Keys that the shim adds only in some states.
OPTIONAL_KEYS = {"start_phase"}


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    yield Gateway(sandbox)


def cli(gw: Gateway, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return gw.sb.run([COMMAND, *args], check=False, timeout=timeout)


def table(gw: Gateway) -> dict[str, str]:
    done = cli(gw, "status")
    assert done.returncode == 0, done.stderr
    rows = {}
    for line in done.stdout.splitlines():
        name, _, value = line.partition("  ")
        rows[name.strip()] = value.strip()
    return rows


def status_json(gw: Gateway) -> dict[str, object]:
    done = cli(gw, "status", "--json")
    assert done.returncode == 0, done.stderr
    data: dict[str, object] = json.loads(done.stdout)
    return data


def test_status_with_nothing_running(gw: Gateway) -> None:
    gw.configure([])
    rows = table(gw)
    assert rows["gateway"].startswith("not running")
    assert rows["engine"].startswith("stopped")
    assert rows["unit"] == "vllm.service"
    assert rows["main pid"] == "-"
    assert rows["vram"].startswith("n/a") or "gpu" in rows["vram"]
    data = status_json(gw)
    assert set(data) == set(STATUS_KEYS)
    assert data["state"] == "stopped" and data["gateway_pid"] is None and data["main_pid"] is None
    assert gw.active("vllm-gateway.service") != "active"  # status did not start the shim


def test_status_while_starting_then_ready(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "4"], stop_after="10m")
    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(gw.chat()[0]))
    t.start()
    try:
        wait_until(lambda: gw.active("vllm.service") in ("active", "activating"), 30, "the engine to start")
        rows = table(gw)
        assert rows["engine"].startswith("starting"), rows
        assert rows["gateway"].startswith("running (pid ")
    finally:
        t.join(60)
    assert results == [200]
    rows = table(gw)
    assert rows["engine"].startswith("ready"), rows
    pid = gw.unit_prop("vllm.service", "MainPID")
    assert rows["main pid"] == pid
    assert rows["next stop"].startswith("in 9m") or rows["next stop"].startswith("in 10m"), rows
    assert rows["next sleep"] == "off"
    assert rows["cold start"] != "-"
    assert re.match(r"\d", rows["idle"]), rows
    data = status_json(gw)
    assert set(data) - OPTIONAL_KEYS == set(gw.status()) - OPTIONAL_KEYS
    assert data["state"] == "ready"


def test_start_sleep_wake_stop_print_timings(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1"], sleep_after="10m", stop_after="20m")
    done = cli(gw, "start")
    assert done.returncode == 0, done.stderr
    assert re.search(r"gateway started in \d+\.\d s", done.stdout), done.stdout
    assert re.search(r"engine ready in \d+\.\d s \(pid \d+\)", done.stdout), done.stdout
    assert gw.status()["state"] == "ready"
    assert "already" in cli(gw, "start").stdout

    done = cli(gw, "sleep")
    assert done.returncode == 0, done.stderr
    assert re.search(r"engine asleep in \d+\.\d s \(level 1\)", done.stdout), done.stdout
    assert gw.status()["state"] == "sleeping"
    rows = table(gw)
    assert rows["engine"].startswith("sleeping") and rows["next sleep"] == "asleep"

    done = cli(gw, "wake")
    assert done.returncode == 0, done.stderr
    assert re.search(r"engine awake in \d+\.\d s", done.stdout), done.stdout
    assert gw.status()["state"] == "ready"

    done = cli(gw, "stop")
    assert done.returncode == 0, done.stderr
    assert re.search(r"engine stopped in \d+\.\d s", done.stdout), done.stdout
    assert gw.status()["state"] == "stopped"
    assert gw.active("vllm.service") != "active"
    assert "already stopped" in cli(gw, "stop").stdout


def test_sleep_and_wake_need_a_running_gateway(gw: Gateway) -> None:
    gw.configure([], sleep_after="10m")
    for action in ("sleep", "wake"):
        done = cli(gw, action)
        assert done.returncode == 1
        assert "not running" in done.stderr
    done = cli(gw, "stop")
    assert done.returncode == 0 and "not running" in done.stdout, done


def test_stop_without_the_gateway_stops_the_unit(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "0"], stop_after="10m")
    assert gw.chat()[0] == 200
    gw.sb.systemctl("stop", "vllm-gateway.service")  # the engine keeps running
    assert gw.active("vllm.service") == "active"
    rows = table(gw)
    assert rows["gateway"].startswith("not running")
    assert rows["engine"].startswith("active"), rows
    data = status_json(gw)
    assert set(data) == set(STATUS_KEYS) and data["state"] == "active" and data["main_pid"]
    done = cli(gw, "stop")
    assert done.returncode == 0, done.stderr
    assert re.search(r"engine stopped in \d+\.\d s", done.stdout), done.stdout
    assert gw.active("vllm.service") != "active"


def test_failed_start_is_reported(gw: Gateway) -> None:
    gw.configure(["--fail-at-startup", "RuntimeError: no GPU for you"])
    done = cli(gw, "start")
    assert done.returncode == 1
    assert "no GPU for you" in done.stderr, done.stderr
    rows = table(gw)
    assert rows["engine"].startswith("failed"), rows
    assert "no GPU for you" in rows["last error"]
    assert status_json(gw)["state"] == "failed"


def test_logs_show_both_units(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "0"])
    assert gw.chat()[0] == 200
    wait_until(lambda: "vllm[" in cli(gw, "logs", "-n", "50").stdout, 10, "the engine's lines in the journal")
    out = cli(gw, "logs", "-n", "50").stdout
    assert "vllm-gateway[" in out, out
    assert "vllm[" in out, out
    assert len(out.splitlines()) <= 51
