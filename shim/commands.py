"""The command line's user commands: status, start, stop, sleep, wake,
restart, reload, logs.

They work whether or not the shim runs. When it runs, they ask it over its
control socket (it alone knows requests in flight and drives the engine);
when it does not, they read systemd directly, and `start` starts it first.
Rendering is kept apart from I/O so that it can be tested with made-up input.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from . import confdiff, control, lifecycle, statusjson, systemd
from .config import EngineConfig, GatewayConfig
from .idle_check import idle_since_without_shim_us
from .lifecycle import State
from .status import parse_status

SHIM_UNIT = "vllm-gateway.service"
IDLE_UNIT = "vllm-gateway-idle.service"
# How long `start` waits for a freshly started shim's control socket.
SHIM_START_WAIT_S = 10.0
# A probe of the control socket: the shim answers status at once.
PROBE_TIMEOUT_S = 5.0
# systemd's "no value" for MemoryCurrent (no memory accounting).
NOT_SET = 2**64 - 1

# The keys of one engine's status, from the shim (GET /gateway/status) or
# from systemd (`status_from_systemd`): scripts see one shape.
STATUS_KEYS = statusjson.STATUS_KEYS

# A colour per group of the engine's states (lifecycle.py), and for the gateway's own words.
_GROUP_COLOURS = ((lifecycle.SERVING, "32"), (lifecycle.CHANGING, "33"), (lifecycle.RESTING, "36"),
                  (lifecycle.OFF, "2"), (lifecycle.BROKEN, "31"))
_COLOURS = {s.value: code for group, code in _GROUP_COLOURS for s in group} | {
    "running": "32", "not running": "2"}
# systemd's words for a running engine, in the status built without the shim
_UNIT_RUNNING = ("active", "activating")


class CommandError(Exception):
    """A command failed; the message is what the user sees."""


# ---- pure parts: the status from systemd, and its rendering ----


def engine_state(unit: systemd.UnitState) -> str:
    """The engine's state as systemd sees it, without the shim."""
    if unit.active_state in (systemd.GONE, "inactive"):
        return State.STOPPED.value
    return unit.active_state


def status_from_systemd(
    engine: EngineConfig, unit: systemd.UnitState, shim: systemd.UnitState, now: float
) -> statusjson.EngineView:
    """What /gateway/status would say, from systemd alone: used when the shim
    does not run or does not answer. The shim's STATUS text, when it has one,
    gives its state, requests in flight and idle time."""
    state = engine_state(unit)
    in_flight = 0
    idle: float | None = None
    reported = parse_status(shim.status_text) if shim.running else None
    if reported is not None:
        state = reported.state
        in_flight = reported.in_flight
        idle = reported.idle_s(now)
    elif unit.running:
        since_us = idle_since_without_shim_us(unit, shim)
        idle = max(0.0, now - since_us / 1e6) if since_us else None
    since_us = unit.active_enter_us if unit.running else unit.inactive_enter_us
    engine_status = statusjson.EngineStatus(
        state=state,
        state_since=since_us / 1e6 if since_us and reported is None else None,
        idle_s=idle,
        in_flight=in_flight,
        waiting=0,
        engine=engine.name,
        unit=engine.unit,
        main_pid=unit.main_pid or None,
        port=engine.port,
        models=tuple(engine.models),
        stop_after_s=engine.stop_after_s,
        sleep_after_s=engine.sleep_after_s,
        sleep_level=engine.sleep_level,
        sleep_enabled=engine.sleep_after_s is not None,
        last_error=_unit_failure(unit),
    )
    process = statusjson.GatewayProcess(
        gateway_pid=(shim.main_pid or None) if shim.running else None,
        gateway_uptime_s=(max(0.0, now - shim.active_enter_us / 1e6)
                          if shim.running and shim.active_enter_us else None),
    )
    return statusjson.without_shim(engine_status, process)


def _unit_failure(unit: systemd.UnitState) -> str | None:
    if unit.active_state == "failed":
        return f"{unit.sub_state or 'failed'} (result: {unit.result or 'unknown'})"
    return None


def duration(seconds: float | None) -> str:
    """'42 s', '3m 05s', '2h 10m'."""
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m {sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"


def size(n: int | None) -> str:
    if n is None:
        return "n/a"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB"


def countdown(after_s: float | None, idle_s: float | None, applies: bool, done: str | None) -> str:
    """Time left before a tier (sleep or stop) acts on the idle engine:
    `applies` where the tier acts on the engine's state, `done` what to say
    where the engine already is where the tier would put it."""
    if after_s is None:
        return "off"
    if done is not None:
        return done
    if not applies:
        return "-"
    if idle_s is None:
        return f"after {duration(after_s)} idle"
    left = after_s - idle_s
    if left <= 0:
        return "due (at the next idle check)"
    return f"in {duration(left)}"


@dataclass(frozen=True)
class Extras:
    """What the table shows beyond /gateway/status."""

    shim: systemd.UnitState
    memory_bytes: int | None
    vram: str
    shim_answered: bool  # the status came from the shim itself
    engine_pid: int = 0  # the unit's MainPID as systemd reports it


def render_table(view: statusjson.EngineView, extras: Extras, now: float, colour: bool = False) -> str:
    """The human status: one aligned `name  value` row per fact."""
    st = view.entry.status
    state = lifecycle.named(st.state)  # None: a word of systemd's, when the shim did not say
    shim = extras.shim
    if shim.running:
        gateway = "running"
        details = []
        if view.process.gateway_pid or shim.main_pid:
            details.append(f"pid {view.process.gateway_pid or shim.main_pid}")
        if view.process.gateway_uptime_s is not None:
            details.append(f"up {duration(view.process.gateway_uptime_s)}")
        if not extras.shim_answered:
            details.append("control socket not answering")
        gateway_value = _paint(gateway, colour) + (f" ({', '.join(details)})" if details else "")
    elif shim.active_state == "failed":
        gateway_value = _paint("failed", colour, State.FAILED.value) + \
            f" ({shim.result or 'see: vllm-gateway logs'})"
    else:
        gateway_value = _paint("not running", colour) + " (starts on the next request)"

    engine_value = _paint(st.state, colour)
    if st.state_since is not None and st.state_since > 0:
        engine_value += f" for {duration(now - st.state_since)}"
    if view.entry.start_phase:
        engine_value += f" ({view.entry.start_phase})"
    engine_value += f"  [{st.engine}, port {st.port}]"

    idle = st.idle_s
    cold_value = "-" if st.last_cold_start_s is None else duration(st.last_cold_start_s)
    if st.last_wake_s is not None:
        cold_value += f" (last wake {duration(st.last_wake_s)})"
    unit_runs = state is None and st.state in _UNIT_RUNNING
    rows = [
        ("gateway", gateway_value),
        ("engine", engine_value),
        ("unit", st.unit),
        ("main pid", str(st.main_pid or extras.engine_pid or "-")),
        ("idle", "busy" if st.in_flight else duration(idle)),
        ("next sleep", f"not supported: {st.sleep_refused}" if st.sleep_refused
         else countdown(st.sleep_after_s, idle, state in lifecycle.SLEEP_TIER,
                        "asleep" if state is State.SLEEPING else None)),
        ("next stop", countdown(st.stop_after_s, idle, state in lifecycle.STOP_TIER or unit_runs,
                                "-" if state is State.STOPPED else None)),
        ("in flight", f"{st.in_flight}" + (f" ({st.waiting} waiting)" if st.waiting else "")),
        ("cold start", cold_value),
        ("last error", last_error(st)),
        ("memory", size(extras.memory_bytes)),
        ("vram", extras.vram),
        *gpu_rows(view.entry.on_gpu, st.sleep_level),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def gpu_rows(on_gpu: statusjson.EngineOnGpu | None, sleep_level: int) -> list[tuple[str, str]]:
    """The engine's GPUs and what it was measured to hold there (shim/meter.py);
    nothing from an older shim, which did not say."""
    if on_gpu is None:
        return []

    def on(by_gpu: object) -> str:
        if not isinstance(by_gpu, dict) or not by_gpu:
            return "-"
        return ", ".join(f"{size(int(n))} on GPU {d}" for d, n in sorted(by_gpu.items()))

    measured = on_gpu.measured_memory
    asleep = measured.get("asleep")
    kept = asleep.get(str(sleep_level)) if isinstance(asleep, dict) else None
    return [("gpus", ", ".join(map(str, on_gpu.gpus))),
            ("measured", f"now {on(measured.get('now'))}; awake {on(measured.get('awake'))}; "
                         f"asleep {on(kept)}")]


def last_error(status: statusjson.EngineStatus) -> str:
    """The last error in one line, with its time; marked past once a start succeeded since."""
    if not status.last_error:
        return "-"
    at = status.last_error_at
    when = time.strftime("%H:%M:%S", time.localtime(at)) + " " if at is not None else ""
    past = " (before the last successful start)" if status.last_error_past else ""
    return f"{when}{status.last_error}{past}"


def _paint(text: str, colour: bool, key: str | None = None) -> str:
    code = _COLOURS.get(key or text)
    if not colour or code is None:
        return text
    return f"\x1b[1;{code}m{text}\x1b[0m"


def use_colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def vram_text(pids: set[int]) -> str:
    """Each GPU's used memory (and the engine's share), when NVML is there."""
    try:
        nvml: Any = importlib.import_module("pynvml")
    except ImportError:
        return "n/a"
    try:
        nvml.nvmlInit()
    except Exception as e:  # NVMLError: no driver, no GPU
        return f"n/a ({e})"
    try:
        parts = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            part = f"gpu{i} {size(int(mem.used))} of {size(int(mem.total))}"
            try:
                procs = nvml.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:
                procs = []
            mine = sum(int(p.usedGpuMemory or 0) for p in procs if p.pid in pids)
            if mine:
                part += f" (engine {size(mine)})"
            parts.append(part)
        return "; ".join(parts) or "no GPU"
    except Exception as e:
        return f"n/a ({e})"
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def cgroup_pids(control_group: str) -> set[int]:
    if not control_group:
        return set()
    try:
        text = (Path("/sys/fs/cgroup") / control_group.lstrip("/") / "cgroup.procs").read_text()
    except OSError:
        return set()
    return {int(p) for p in text.split()}


def error_message(body: bytes) -> str:
    """The message of OpenAI's error JSON, or the body as text."""
    try:
        data = json.loads(body)
        message = data["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return body.decode(errors="replace").strip() or "no answer"


def journal_argv(units: Sequence[str], *, user: bool, follow: bool, lines: int | None) -> list[str]:
    argv = ["journalctl", *(["--user"] if user else [])]
    for unit in units:
        argv += ["-u", unit]
    if lines is not None:
        argv += ["-n", str(lines)]
    if follow:
        argv.append("-f")
    return argv


# ---- I/O ----


async def memory_current(sd: systemd.Systemd, unit: str) -> int | None:
    return await sd.memory_current(unit)


def status(cfg: GatewayConfig, as_json: bool) -> int:
    """Every engine's table or JSON. With several, each is named (a header,
    a key under "engines"); one engine's is as it always was."""
    named = len(cfg.engines) > 1
    every: dict[str, object] = {}
    for i, engine in enumerate(cfg.engines.values()):
        try:
            view, extras = trio.run(gather, engine)
        except (OSError, systemd.SystemdError) as e:
            return _bus_error(e)
        if as_json:
            every[engine.name] = view.as_json()
            continue
        if named:
            print(f"\n== engine {engine.name} ==" if i else f"== engine {engine.name} ==")
        print(render_table(view, extras, time.time(), use_colour()))
    if as_json:
        print(json.dumps({"engines": every} if named else every[cfg.engine.name], indent=2))
    return 0


async def gather(engine: EngineConfig) -> tuple[statusjson.EngineView, Extras]:
    async with systemd.connect() as sd:
        unit = await sd.unit_state(engine.unit)
        shim = await sd.unit_state(SHIM_UNIT)
        memory = await memory_current(sd, engine.unit) if unit.running else None
    answer = await control.request("GET", "/gateway/status", PROBE_TIMEOUT_S) if shim.running else None
    status = _parsed(answer[1]) if answer is not None and answer[0] == 200 else None
    view = _engine_view(status, engine)
    if view is None:
        view = status_from_systemd(engine, unit, shim, time.time())
    vram = vram_text(cgroup_pids(unit.control_group)) if unit.running else _vram_idle()
    return view, Extras(shim=shim, memory_bytes=memory, vram=vram, shim_answered=status is not None,
                        engine_pid=unit.main_pid)


def _parsed(body: bytes) -> statusjson.GatewayStatus | None:
    """The shim's status; None for an answer that is none."""
    try:
        return statusjson.parse(json.loads(body))
    except ValueError:  # not JSON, or not the schema (StatusError)
        return None


def _vram_idle() -> str:
    return vram_text(set())


def _bus_error(e: Exception) -> int:
    print(f"vllm-gateway: cannot ask systemd's user manager at {systemd.session_bus_address()}: {e}",
          file=sys.stderr)
    return 1


def _say(line: str) -> None:
    print(line, flush=True)


async def _shim_status() -> statusjson.GatewayStatus | None:
    answer = await control.request("GET", "/gateway/status", PROBE_TIMEOUT_S)
    if answer is None or answer[0] != 200:
        return None
    return _parsed(answer[1])


async def _start_shim() -> statusjson.GatewayStatus:
    t0 = time.monotonic()
    done = await trio.run_process(["systemctl", "--user", "start", SHIM_UNIT], check=False,
                                  capture_stdout=True, capture_stderr=True)
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip()
        raise CommandError(f"vllm-gateway: cannot start {SHIM_UNIT}: {why} (see: vllm-gateway logs)")
    deadline = t0 + SHIM_START_WAIT_S
    while time.monotonic() < deadline:
        st = await _shim_status()
        if st is not None:
            _say(f"gateway started in {time.monotonic() - t0:.1f} s (pid {st.process.gateway_pid})")
            return st
        await trio.sleep(0.1)
    raise CommandError(f"vllm-gateway: {SHIM_UNIT} started, but its control socket "
                       f"{control.socket_path()} did not answer within {SHIM_START_WAIT_S:g} s")


async def _stop_without_shim(engine: EngineConfig) -> str:
    t0 = time.monotonic()
    async with systemd.connect() as sd:
        unit = await sd.unit_state(engine.unit)
        if not unit.running and unit.active_state != "deactivating":
            return f"engine was not running ({engine_state(unit)})"
        async with sd.watch(engine.unit) as changes:
            await sd.stop_unit(engine.unit)
            with trio.move_on_after(engine.stop_timeout_s + 10):
                async for change in changes:
                    match change:
                        case systemd.UnitRemoved() | systemd.ActiveStateChanged("inactive" | "failed"):
                            break
        final = await sd.unit_state(engine.unit)
    if final.running or final.active_state == "deactivating":
        raise CommandError(f"vllm-gateway: {engine.unit} is still {final.active_state} "
                           f"after {time.monotonic() - t0:.1f} s")
    return f"engine stopped in {time.monotonic() - t0:.1f} s (the gateway was not running)"


async def _unit_pid(unit: str) -> int:
    try:
        async with systemd.connect() as sd:
            return (await sd.unit_state(unit)).main_pid
    except (OSError, systemd.SystemdError):
        return 0


_DONE = {"start": "ready", "stop": "stopped", "sleep": "asleep", "wake": "awake", "restart": "restarted"}


async def control_action(engine: EngineConfig, action: str, named: bool = False) -> str:
    """Do `action` (start, stop, sleep, wake, restart) to `engine` and say what
    happened. `named`: the call names the engine (`?engine=`), as it must
    where the gateway has several; unnamed, it goes to the only one."""
    before = _engine_view(await _shim_status(), engine)
    if before is None:
        if action == "stop":
            return await _stop_without_shim(engine)
        if action not in ("start", "restart"):
            raise CommandError(f"vllm-gateway: the gateway is not running, so the engine is not "
                               f"running either: nothing to {action}")
        before = _engine_view(await _start_shim(), engine)
        assert before is not None
    state = lifecycle.named(before.entry.status.state)
    done = {"start": State.READY, "stop": State.STOPPED, "sleep": State.SLEEPING, "wake": State.READY}
    if action in done and state is done[action]:
        return f"engine already {_DONE[action]}"
    timeout = {
        "start": engine.start_timeout_s + 60,
        "stop": engine.stop_grace_s + engine.stop_timeout_s + 30,
        "sleep": engine.stop_timeout_s + 330,
        "wake": engine.start_timeout_s + 60,
        "restart": engine.stop_timeout_s + engine.start_timeout_s + 90,
    }[action]
    t0 = time.monotonic()
    which = f"?engine={engine.name}" if named else ""
    answer = await control.request("POST", f"/gateway/{action}{which}", timeout)
    took = time.monotonic() - t0
    if answer is None:
        raise CommandError(f"vllm-gateway: the gateway did not answer {action} within {timeout:g} s")
    code, body = answer
    if code != 200:
        raise CommandError(error_message(body))
    after = _engine_view(_parsed(body), engine)
    after_status = None if after is None else after.entry.status
    waking = action in ("start", "wake", "restart")
    pid = (after_status and after_status.main_pid) or (await _unit_pid(engine.unit) if waking else None)
    line = f"engine {_DONE[action]} in {took:.1f} s"
    if action in ("start", "wake", "restart") and pid:
        line += f" (pid {pid})"
    if action == "start" and state is State.SLEEPING:
        line += " (woken from sleep)"
    if action == "sleep":
        line += f" (level {after_status and after_status.sleep_level})"
    return line


def _engine_view(
    status: statusjson.GatewayStatus | None, engine: EngineConfig
) -> statusjson.EngineView | None:
    """One engine's part of /gateway/status, with the gateway's fields; the
    only engine's where the shim has one under another name."""
    if status is None:
        return None
    view = statusjson.engine_view(status, engine.name)
    if view is None and len(status.engines) == 1:
        view = statusjson.engine_view(status, next(iter(status.engines)))
    return view


def manual(cfg: GatewayConfig, action: str, name: str | None) -> int:
    if name is not None and name not in cfg.engines:
        print(f"vllm-gateway: no engine named {name!r}; engines: {', '.join(cfg.engines)}", file=sys.stderr)
        return 2
    # with several engines, each is named: in the call, and on its line
    named = len(cfg.engines) > 1
    if name is None and named and action in ("start", "wake", "restart"):
        print(f"vllm-gateway: name the engine to {action}: {', '.join(cfg.engines)}", file=sys.stderr)
        return 2
    targets = [cfg.engines[name]] if name is not None else list(cfg.engines.values())
    try:
        for engine in targets:
            line = trio.run(control_action, engine, action, named)
            _say(f"{engine.name}: {line}" if named else line)
    except CommandError as e:
        print(str(e), file=sys.stderr)
        return 1
    except (OSError, systemd.SystemdError) as e:
        return _bus_error(e)
    return 0


def logs(engine_units: Sequence[str], follow: bool, lines: int | None) -> int:
    """Exec journalctl on the shim's, the engine's and the idle check's units.

    A user manager's units are filed as user units, except where it runs at
    the root of its own cgroup namespace (containers, the test sandbox):
    there journald files them as system units, so use those when the user
    journal has nothing (as journal.tail does)."""
    units = [SHIM_UNIT, *engine_units, IDLE_UNIT]
    probe = [*journal_argv(units, user=True, follow=False, lines=1), "--quiet", "--no-pager", "-o", "cat"]
    try:
        found = subprocess.run(probe, capture_output=True, text=True, timeout=10, check=False)
        user = bool(found.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        user = True
    argv = journal_argv(units, user=user, follow=follow, lines=lines)
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        print(f"vllm-gateway: cannot run journalctl: {e}", file=sys.stderr)
    return 1


def reload() -> int:
    """Ask the running gateway to read its configuration again; it refuses a
    bad file (and keeps what runs), which makes this fail with its reason."""
    try:
        answer = trio.run(control.request, "POST", "/gateway/reload", PROBE_TIMEOUT_S)
    except OSError as e:
        return _bus_error(e)
    if answer is None:
        _say("the gateway is not running: the configuration applies when it starts (at the next request)")
        return 0
    code, body = answer
    if code != 200:
        print(error_message(body), file=sys.stderr)
        return 1
    _say("\n".join(reload_lines(json.loads(body))))
    return 0


def reload_lines(summary: Mapping[str, Any]) -> list[str]:
    """A reload's summary (confdiff.Plan.summary) as lines for a person."""
    changed = summary.get("changed") or []
    lines = [f"reloaded: {len(changed)} change{'s' if len(changed) != 1 else ''}"]
    lines += [f"  {c}" for c in changed]
    for name in summary.get("restart_when_idle") or []:
        lines.append(f"engine {name} runs its old command line until it is idle, then restarts "
                     f"(now: vllm-gateway restart {name})")
    later = summary.get("when_the_gateway_restarts") or []
    if later:
        lines.append("applies when the gateway restarts (systemctl --user restart vllm-gateway):")
        lines += [f"  {c}" for c in later]
    return lines


def running_differences(cfg: GatewayConfig) -> list[str] | None:
    """How `cfg` differs from what the running gateway uses; None when no
    gateway runs (or it does not answer)."""
    try:
        answer = trio.run(control.request, "GET", "/gateway/config", PROBE_TIMEOUT_S)
    except OSError:
        return None
    if answer is None or answer[0] != 200:
        return None
    running = json.loads(answer[1])
    if not isinstance(running, dict):
        return None
    return [c.describe() for c in confdiff.diff(running, confdiff.flatten(cfg))]
