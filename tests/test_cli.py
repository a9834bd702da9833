"""The command line without I/O: the status table, the status JSON built from
systemd when the shim does not answer, error messages, journalctl's
arguments, and an example in every command's --help."""

from __future__ import annotations

import sys
import time
import types
from typing import Any

import pytest

from shim import cli, commands
from shim.commands import STATUS_KEYS, Extras, render_table, status_from_systemd
from shim.config import EngineConfig
from shim.statusjson import EngineView, engine_view, parse
from shim.systemd import GONE, UnitState

NOW = 1_800_000_000.0
ENGINE = EngineConfig(name="main", command=("vllm", "serve", "m"), models=("m",), port=8100,
                      stop_after_s=600.0, sleep_after_s=120.0)
NO_SHIM = UnitState("inactive", inactive_enter_us=int((NOW - 50) * 1e6))


def shim_running(text: str = "", pid: int = 77) -> UnitState:
    return UnitState("active", "running", main_pid=pid, status_text=text,
                     active_enter_us=int((NOW - 300) * 1e6))


def rows(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition("  ")
        out[name.strip()] = value.strip()
    return out


def extras(shim: UnitState = NO_SHIM, **kw: Any) -> Extras:
    base: dict[str, Any] = {"memory_bytes": 3 * 2**30, "vram": "n/a", "shim_answered": False}
    base.update(kw)
    return Extras(shim=shim, **base)


# ---- JSON from systemd ----


def test_fallback_has_the_keys_of_gateway_status() -> None:
    st = status_from_systemd(ENGINE, UnitState(GONE), NO_SHIM, NOW).as_json()
    assert tuple(st) == STATUS_KEYS


def test_fallback_with_nothing_running_is_stopped() -> None:
    st = status_from_systemd(ENGINE, UnitState(GONE), NO_SHIM, NOW).as_json()
    assert st["state"] == "stopped"
    assert st["main_pid"] is None and st["gateway_pid"] is None and st["gateway_uptime_s"] is None
    assert st["idle_s"] is None and st["in_flight"] == 0
    assert st["unit"] == "vllm.service" and st["port"] == 8100 and st["models"] == ["m"]
    assert st["stop_after_s"] == 600.0 and st["sleep_after_s"] == 120.0 and st["sleep_enabled"] is True


def test_fallback_engine_without_shim_counts_idle_like_the_idle_check() -> None:
    unit = UnitState("active", "running", main_pid=4242, active_enter_us=int((NOW - 90) * 1e6))
    st = status_from_systemd(ENGINE, unit, NO_SHIM, NOW).as_json()
    assert st["state"] == "active"  # systemd cannot tell ready from loading
    assert st["main_pid"] == 4242
    assert st["idle_s"] == 50.0  # the shim exited 50 s ago, after the engine started
    assert st["state_since"] == round(NOW - 90, 3)


def test_fallback_uses_the_shims_status_text() -> None:
    shim = shim_running(f"state=sleeping in_flight=0 idle_since={NOW - 200:.3f} idle_s=200 unit=vllm.service")
    unit = UnitState("active", "running", main_pid=4242, active_enter_us=int((NOW - 900) * 1e6))
    st = status_from_systemd(ENGINE, unit, shim, NOW).as_json()
    assert st["state"] == "sleeping" and st["idle_s"] == 200.0
    assert st["gateway_pid"] == 77 and st["gateway_uptime_s"] == 300.0


def test_fallback_reports_a_failed_unit() -> None:
    unit = UnitState("failed", "failed", result="exit-code")
    st = status_from_systemd(ENGINE, unit, NO_SHIM, NOW).as_json()
    assert st["state"] == "failed"
    assert st["last_error"] == "failed (result: exit-code)"


def test_fallback_without_sleep_after() -> None:
    eng = EngineConfig(name="e", command=("x",), sleep_after_s=None, stop_after_s=None)
    st = status_from_systemd(eng, UnitState("inactive"), NO_SHIM, NOW).as_json()
    assert st["sleep_enabled"] is False and st["stop_after_s"] is None


# ---- the table ----


def shim_json(**kw: Any) -> dict[str, Any]:
    st: dict[str, Any] = {
        "state": "ready", "state_since": NOW - 65, "idle_s": 42.0, "in_flight": 0, "waiting": 0,
        "engine": "main", "unit": "vllm.service", "main_pid": 4242, "port": 8100, "models": ["m"],
        "stop_after_s": 600.0, "sleep_after_s": 120.0, "sleep_level": 1, "sleep_enabled": True,
        "last_sleep_error": None, "last_wake_s": None, "last_cold_start_s": 41.234, "last_error": None,
        "gateway_pid": 77, "gateway_uptime_s": 300.0,
    }
    st.update(kw)
    return st


def shown(**kw: Any) -> EngineView:
    """`shim_json` as the command line reads it: the shim's status of one engine."""
    st = shim_json(**kw)
    fleet = {"holds": {}, "swaps": 0, "gpu": None, "gpus": {}, "held_gpus": {}}
    view = engine_view(parse({**st, "engines": {"main": st}, **fleet}), "main")
    assert view is not None
    return view


def test_table_ready() -> None:
    more = extras(shim_running(), shim_answered=True, vram="gpu0 7.9 GiB of 24.0 GiB")
    text = render_table(shown(), more, NOW)
    r = rows(text)
    assert list(r) == ["gateway", "engine", "unit", "main pid", "idle", "next sleep", "next stop",
                       "in flight", "cold start", "last error", "memory", "vram"]
    assert r["gateway"] == "running (pid 77, up 5m 00s)"
    assert r["engine"] == "ready for 1m 05s  [main, port 8100]"
    assert r["unit"] == "vllm.service" and r["main pid"] == "4242"
    assert r["idle"] == "42 s"
    assert r["next sleep"] == "in 1m 18s"
    assert r["next stop"] == "in 9m 18s"
    assert r["in flight"] == "0"
    assert r["cold start"] == "41 s"
    assert r["last error"] == "-"
    assert r["memory"] == "3.0 GiB"
    assert r["vram"] == "gpu0 7.9 GiB of 24.0 GiB"
    assert "\x1b" not in text


def test_table_columns_are_aligned() -> None:
    lines = render_table(shown(), extras(shim_running()), NOW).splitlines()
    starts = {len(line) - len(line[len(line.split("  ")[0]):].lstrip()) for line in lines}
    assert len(starts) == 1, lines


def test_table_stopped_without_shim() -> None:
    st = status_from_systemd(ENGINE, UnitState(GONE), NO_SHIM, NOW)
    r = rows(render_table(st, extras(memory_bytes=None), NOW))
    assert r["gateway"] == "not running (starts on the next request)"
    assert r["engine"].startswith("stopped")
    assert r["main pid"] == "-" and r["idle"] == "-"
    assert r["next sleep"] == "-" and r["next stop"] == "-"
    assert r["memory"] == "n/a" and r["vram"] == "n/a"


def test_table_busy_and_waiting() -> None:
    r = rows(render_table(shown(state="starting", in_flight=3, waiting=2, idle_s=0.0,
                                    start_phase="loading weights"), extras(shim_running()), NOW))
    assert r["idle"] == "busy"
    assert r["in flight"] == "3 (2 waiting)"
    assert "(loading weights)" in r["engine"]
    assert r["next sleep"] == "-"


def test_table_sleeping_and_due() -> None:
    st = shown(state="sleeping", idle_s=700.0, last_wake_s=1.5)
    r = rows(render_table(st, extras(shim_running()), NOW))
    assert r["next sleep"] == "asleep"
    assert r["next stop"] == "due (at the next idle check)"
    assert r["cold start"] == "41 s (last wake 1.5 s)"


def test_table_tiers_off() -> None:
    r = rows(render_table(shown(stop_after_s=None, sleep_after_s=None), extras(shim_running()), NOW))
    assert r["next sleep"] == "off" and r["next stop"] == "off"


def test_table_failed_with_error() -> None:
    r = rows(render_table(shown(state="failed", main_pid=None, last_error="boom: CUDA out of memory"),
                          extras(shim_running()), NOW))
    assert r["engine"].startswith("failed")
    assert r["last error"] == "boom: CUDA out of memory"
    assert r["next stop"] == "-"


def test_table_engine_that_cannot_sleep() -> None:
    reason = "Sleep mode is not supported on current platform."
    at = NOW - 3600
    r = rows(render_table(shown(sleep_enabled=False, sleep_refused=reason, last_sleep_error=reason,
                                    last_error=f"sleep mode refused: {reason}", last_error_at=at,
                                    last_error_past=True),
                          extras(shim_running()), NOW))
    assert r["next sleep"] == f"not supported: {reason}"
    clock = time.strftime("%H:%M:%S", time.localtime(at))
    assert r["last error"] == f"{clock} sleep mode refused: {reason} (before the last successful start)"
    # a sleep error alone is no error: a refused sleep mode shows on its own row
    r = rows(render_table(shown(last_sleep_error=reason), extras(shim_running()), NOW))
    assert r["last error"] == "-"


def test_table_main_pid_from_systemd_when_the_shim_has_none() -> None:
    r = rows(render_table(shown(main_pid=None), extras(shim_running(), engine_pid=99), NOW))
    assert r["main pid"] == "99"


def test_table_shim_not_answering() -> None:
    r = rows(render_table(shown(), extras(shim_running(), shim_answered=False), NOW))
    assert "control socket not answering" in r["gateway"]


def test_table_colour_only_on_the_state() -> None:
    text = render_table(shown(), extras(shim_running()), NOW, colour=True)
    r = rows(text)
    assert r["engine"].startswith("\x1b[1;32mready\x1b[0m")
    assert r["gateway"].startswith("\x1b[1;32mrunning\x1b[0m")
    assert "\x1b" not in "".join(v for k, v in r.items() if k not in ("engine", "gateway"))


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (0.0, "0.0 s"), (4.25, "4.2 s"), (42.0, "42 s"), (61.0, "1m 01s"), (3600 + 120, "1h 02m"),
])
def test_duration(seconds: float | None, text: str) -> None:
    assert commands.duration(seconds) == text


# ---- VRAM, errors, journalctl ----


def test_vram_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert commands.vram_text({1}) == "n/a"


def test_vram_with_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=8 * 2**30, total=24 * 2**30),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            types.SimpleNamespace(pid=10, usedGpuMemory=6 * 2**30),
            types.SimpleNamespace(pid=11, usedGpuMemory=2**30),
        ],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert commands.vram_text({10}) == "gpu0 8.0 GiB of 24.0 GiB (engine 6.0 GiB)"


def test_error_message_from_openai_error_json() -> None:
    body = b'{"error": {"message": "vllm-gateway: the engine is stopped, not sleeping", "type": "x"}}'
    assert commands.error_message(body) == "vllm-gateway: the engine is stopped, not sleeping"
    assert commands.error_message(b"plain text\n") == "plain text"


def test_journal_arguments() -> None:
    units = ["vllm-gateway.service", "vllm.service", "vllm-gateway-idle.service"]
    assert commands.journal_argv(units, user=True, follow=True, lines=50) == [
        "journalctl", "--user", "-u", "vllm-gateway.service", "-u", "vllm.service",
        "-u", "vllm-gateway-idle.service", "-n", "50", "-f"]
    assert commands.journal_argv(units[:1], user=False, follow=False, lines=None) == [
        "journalctl", "-u", "vllm-gateway.service"]


# ---- --help ----


@pytest.mark.parametrize("command", [
    [], ["status"], ["start"], ["stop"], ["sleep"], ["wake"], ["logs"], ["serve"], ["idle-check"],
    ["config"], ["config", "check"],
])
def test_help_shows_an_example(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main([*command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out
    assert "vllm-gateway" in out.split("example", 1)[1]


def test_serve_stays_importable() -> None:
    from shim.cli import serve
    assert callable(serve)
