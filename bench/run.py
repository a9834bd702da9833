#!/usr/bin/env python3
"""Run every benchmark, print the table, write docs/benchmarks.md and plots.

Run through scripts/bench, which puts this inside scripts/sandbox: the shim
starts its engine through the systemd user manager that the sandbox provides,
and every process started here dies with the sandbox's PID namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PY = sys.executable
SHIM = Path(PY).parent / "vllm-gateway"
PROXYD = "/lib/systemd/systemd-socket-proxyd"
EVENTS = 100  # SSE events per stream, [DONE] included
# The paced streams: what a GPU's decoding looks like from the gateway, each
# token its own chunk. 25 ms a token is 40 tokens/s a stream, a mid-sized
# model's pace; 256 such streams are about what one large GPU decodes in all.
PACED_EVENTS = 50
PACED_INTERVAL_MS = 25.0
PACED_STREAMS = (64, 256)

sys.path.insert(0, str(BENCH))
from load import TOOLS  # noqa: E402

PEERS = ["direct", "socket-proxyd", "fastapi+httpx", "vllm-gateway", "vllm-gateway+rewrite"]


@dataclass
class Durations:
    chat32: float
    chat1: float
    stream64: float
    stream1: float
    warmup: float
    cold_runs: int
    idle_s: float
    paced: float  # the measured window at each number of paced streams
    paced_warmup: float
    # windows of each peer at each number of paced streams, in rounds (see
    # `paced_rounds`); the figures are their medians
    paced_windows: int
    # the longest wait for the machine to go idle after each paced window
    settle_s: float


QUICK = Durations(chat32=2.0, chat1=1.5, stream64=2.0, stream1=1.0, warmup=0.3, cold_runs=3, idle_s=5.0,
                  paced=1.5, paced_warmup=0.5, paced_windows=1, settle_s=5.0)
FULL = Durations(chat32=10.0, chat1=5.0, stream64=10.0, stream1=3.0, warmup=1.0, cold_runs=20, idle_s=10.0,
                 paced=8.0, paced_warmup=1.5, paced_windows=3, settle_s=20.0)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


# Admin calls (/gateway/stop) need this key where the gateway checks one.
ADMIN_KEY = "bench-admin-key-0123456789"


def admin_key_known() -> bool:
    """Whether this version of the gateway takes `[gateway] admin_key`."""
    sys.path.insert(0, str(REPO))
    try:
        from shim import config as shim_config

        shim_config.parse({"gateway": {"admin_key": ADMIN_KEY}, "engines": {"m": {"command": ["x"]}}})
        return True
    except Exception:
        return False


def call(port: int, method: str, path: str, body: Any = None, timeout_s: float = 30.0) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        raw = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if raw else {}
        if path.startswith("/gateway/"):
            headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        c.request(method, path, body=raw, headers=headers)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def check_peer(port: int, tools: bool = False) -> None:
    """One whole and one streamed completion: the peer works and passes the stream on intact."""
    body: dict[str, Any] = {"model": "bench", "messages": [{"role": "user", "content": "hi"}]}
    if tools:
        body["tools"] = TOOLS
    status, data = call(port, "POST", "/v1/chat/completions", body)
    if status != 200 or b"chat.completion" not in data:
        raise RuntimeError(f"port {port}: chat completion answered {status}: {data[:200]!r}")
    status, data = call(port, "POST", "/v1/chat/completions", {**body, "stream": True})
    n = data.count(b"data:")
    if status != 200 or n != EVENTS or not data.rstrip().endswith(b"data: [DONE]"):
        raise RuntimeError(f"port {port}: stream answered {status} with {n} events: {data[-200:]!r}")


# ---------------------------------------------------------------------------
# Processes


class Procs:
    """Every process started here, each in its own process group, ended in reverse."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(self.logdir / f"{name}.log", "ab")
        p = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=REPO,
        )
        out.close()
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # whatever it left in its group

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            self.stop(p)


# ---------------------------------------------------------------------------
# Load


def wrk(url: str, conns: int, seconds: float, tools: bool, cpu_pid: int | None = None) -> dict[str, float]:
    cpu0 = cpu_seconds(cpu_pid) if cpu_pid else 0.0
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(BENCH / ("chat-tools.lua" if tools else "chat.lua")),
            url + "/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    cpu = cpu_seconds(cpu_pid) - cpu0 if cpu_pid else 0.0
    units = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
    res: dict[str, float] = {"errors": 0.0}
    for line in out.splitlines():
        parts = line.split()
        if " requests in " in line and parts[0].isdigit() and cpu_pid and int(parts[0]):
            res["cpu_us_per_request"] = cpu / int(parts[0]) * 1e6
        if line.startswith("Requests/sec:"):
            res["rps"] = float(parts[1])
        elif len(parts) == 2 and parts[0] in ("50%", "99%"):
            v = parts[1]
            unit = next(u for u in ("us", "ms", "s") if v.endswith(u))
            res["p50_ms" if parts[0] == "50%" else "p99_ms"] = float(v[: -len(unit)]) * units[unit]
        elif "Non-2xx" in line or "Socket errors" in line:
            res["errors"] += sum(int(x.strip(",")) for x in parts if x.strip(",").isdigit())
    if "rps" not in res:
        raise RuntimeError(f"wrk printed no figures:\n{out}")
    return res


def loadpy(
    mode: str, url: str, conns: int, seconds: float, warmup: float, tools: bool = False,
    cpu_pid: int | None = None, extra_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    out = subprocess.run(
        [
            PY,
            str(BENCH / "load.py"),
            mode,
            "--url",
            url,
            "--conns",
            str(conns),
            "--duration",
            str(seconds),
            "--warmup",
            str(warmup),
            *(["--tools"] if tools else []),
            *(["--cpu-pid", str(cpu_pid)] if cpu_pid else []),
            *extra_args,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + warmup + 60,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    port: int, d: Durations, use_wrk: bool, tools: bool = False, pid: int | None = None
) -> dict[str, float]:
    """The figures of one peer; with `pid`, also that process's CPU time per
    request at 32 connections and per stream at 64."""
    url = f"http://127.0.0.1:{port}"
    check_peer(port, tools)
    r: dict[str, float] = {}
    if use_wrk:
        c32 = wrk(url, 32, d.chat32, tools, pid)
        c1 = wrk(url, 1, d.chat1, tools)
    else:
        c32 = loadpy("chat", url, 32, d.chat32, d.warmup, tools, pid)
        c1 = loadpy("chat", url, 1, d.chat1, d.warmup, tools)
    if "cpu_us_per_request" in c32:
        r["cpu_req"] = c32["cpu_us_per_request"]
    r.update(
        rps32=c32["rps"],
        p50_32=c32["p50_ms"],
        p99_32=c32["p99_ms"],
        p50_1=c1["p50_ms"],
        p99_1=c1["p99_ms"],
        errors=c32["errors"] + c1["errors"],
    )
    s64 = loadpy("stream", url, 64, d.stream64, d.warmup, tools, pid)
    s1 = loadpy("stream", url, 1, d.stream1, d.warmup, tools)
    if "cpu_us_per_request" in s64:
        r["cpu_stream"] = s64["cpu_us_per_request"]
    r.update(
        eps64=s64["events_per_s"],
        ttfe_p50_64=s64["ttfe_p50_ms"],
        ttfe_p99_64=s64["ttfe_p99_ms"],
        ttfe_p50_1=s1["ttfe_p50_ms"],
        errors=r["errors"] + s64["errors"] + s1["errors"],
    )
    return r


def paced_window(url: str, n: int, d: Durations, tools: bool, pid: int | None,
                 starts: str = "together") -> dict[str, Any]:
    """One window of `n` paced streams through `url` (bench/load.py's figures;
    `starts`: its, within one interval unless told)."""
    return loadpy("paced", url, n, d.paced, d.paced_warmup, tools, pid,
                  ("--events", str(PACED_EVENTS), "--interval-ms", f"{PACED_INTERVAL_MS:g}",
                   "--starts", starts))


def paced(url: str, d: Durations, tools: bool, pid: int | None, starts: str = "together") -> dict[str, float]:
    """The paced streams of one peer at each number of streams, as
    `pN_`-prefixed figures: `d.paced_windows` windows one after the other,
    combined by `combine_windows` (bench/ab.py's reading; a full run takes
    `paced_rounds`)."""
    r: dict[str, float] = {}
    for n in PACED_STREAMS:
        r.update(combine_windows(n, [paced_window(url, n, d, tools, pid, starts)
                                     for _ in range(d.paced_windows)]))
    return r


@dataclass
class PacedPeer:
    """A peer in the paced rounds: its port, whether its load offers a tool,
    and the process whose CPU it costs (None: not counted)."""

    name: str
    port: int
    tools: bool = False
    pid: int | None = None


def paced_rounds(peers: list[PacedPeer], d: Durations, notes: list[str]) -> dict[str, dict[str, float]]:
    """The paced streams of every peer, interleaved: at each number of
    streams, `d.paced_windows` rounds of one window of each peer in turn,
    combined per peer by `combine_windows`. A minute of other work on the
    machine then moves one window of every peer, which the medians leave
    out, rather than every window of one peer; and the figures compared
    (CPU against socket-proxyd's, delay against direct's) come from the
    same moments. A peer whose window fails leaves the rounds and is not
    reported (a note says why)."""
    windows: dict[str, dict[int, list[dict[str, Any]]]] = {p.name: {n: [] for n in PACED_STREAMS}
                                                          for p in peers}
    failed: set[str] = set()
    for n in PACED_STREAMS:
        for i in range(d.paced_windows):
            log(f"paced streams: {n}, round {i + 1} of {d.paced_windows}")
            for p in peers:
                if p.name in failed:
                    continue
                try:
                    windows[p.name][n].append(
                        paced_window(f"http://127.0.0.1:{p.port}", n, d, p.tools, p.pid))
                except Exception as e:  # a peer that fails leaves a gap, not a crashed run
                    log(f"{p.name} failed: {e}")
                    notes.append(f"{p.name}: paced streams not measured: {e}")
                    failed.add(p.name)
                settle(d.settle_s)
    out: dict[str, dict[str, float]] = {}
    for p in peers:
        if p.name not in failed:
            out[p.name] = {}
            for n in PACED_STREAMS:
                out[p.name].update(combine_windows(n, windows[p.name][n]))
    return out


def cpu_jiffies() -> tuple[int, int]:
    """The machine's busy and total CPU time so far, in clock ticks (/proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(f[:8])  # user .. steal (guest time is within user)
    return total - f[3] - f[4], total


def settle(limit_s: float, busy_below: float = 0.05) -> None:
    """Wait, at most `limit_s`, until the machine's CPUs are nearly idle over
    0.2 s: what one peer's window leaves running (a saturated peer's backlog,
    the engine's writes to closed streams) does not fall into the next one."""
    t0 = time.monotonic()
    busy0, total0 = cpu_jiffies()
    while time.monotonic() - t0 < limit_s:
        time.sleep(0.2)
        busy1, total1 = cpu_jiffies()
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) < busy_below:
            if time.monotonic() - t0 > 1.0:
                log(f"the machine was idle again after {time.monotonic() - t0:.1f} s")
            return
        busy0, total0 = busy1, total1
    log(f"the machine was still busy after {limit_s:g} s; going on")


def combine_windows(n: int, windows: list[dict[str, Any]]) -> dict[str, float]:
    """One reading of a peer's paced windows at `n` streams: the median of
    each figure, the largest max, errors and stalls summed; each window's
    delay p99 as `pN_windowI_p99_ms` where there are several."""
    r: dict[str, float] = {}
    for key in ("events_per_s", "offered_per_s", "delay_p50_ms", "delay_p99_ms", "delay_max_ms",
                "ttfe_p50_ms", "ttfe_p99_ms", "errors", "stalls", "cpu_us_per_event", "cpu_core_pct",
                "first_delay_p99_ms", "later_delay_p99_ms"):
        values = [float(w[key]) for w in windows if key in w]
        if not values:
            continue
        if key in ("errors", "stalls"):
            r[f"p{n}_{key}"] = sum(values)
        elif key == "delay_max_ms":
            r[f"p{n}_{key}"] = max(values)
        else:
            r[f"p{n}_{key}"] = statistics.median(values)
    if len(windows) > 1:
        for i, w in enumerate(windows):
            if "delay_p99_ms" in w:
                r[f"p{n}_window{i}_p99_ms"] = float(w["delay_p99_ms"])
    return r


# ---------------------------------------------------------------------------
# The gateway


def unit_environment() -> dict[str, str]:
    """The environment the installed unit gives the serving process
    (units/vllm-gateway.service's `Environment=` lines): the gateway is
    measured as it runs for its users."""
    env = {}
    for line in (REPO / "units" / "vllm-gateway.service").read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value
    return env


@dataclass
class Shim:
    procs: Procs
    workdir: Path
    name: str
    engine_cmd: list[str]
    fmt: str = "off"
    exit_after: str = "off"
    port: int = field(default_factory=free_port)
    engine_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def unit(self) -> str:
        return f"bench-{self.name}.service"

    def start(self) -> None:
        cfg = self.workdir / f"{self.name}.toml"
        cfg.write_text(
            f'[gateway]\nlisten = "127.0.0.1:{self.port}"\nexit_after = "{self.exit_after}"\n'
            + (f'admin_key = "{ADMIN_KEY}"\n' if admin_key_known() else "")
            + f"[engines.main]\ncommand = {json.dumps(self.engine_cmd)}\nport = {self.engine_port}\n"
            f'models = ["bench"]\nunit = "{self.unit}"\nstop_after = "off"\n'
            f'tool_call_format = "{self.fmt}"\nstart_timeout = "60s"\n'
        )
        self.proc = self.procs.start(f"shim-{self.name}", [str(SHIM), "--config", str(cfg), "serve"],
                                     env=unit_environment())
        wait_port(self.port)

    def status(self) -> dict[str, Any]:
        _code, body = call(self.port, "GET", "/gateway/status")
        result: dict[str, Any] = json.loads(body)
        return result

    def stop_engine(self) -> None:
        code, body = call(self.port, "POST", "/gateway/stop", timeout_s=60)
        if code != 200 or json.loads(body)["state"] != "stopped":
            raise RuntimeError(f"{self.unit}: stop answered {code}: {body[:200]!r}")

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError, RuntimeError, KeyError, ValueError):
                if self.proc.poll() is None:
                    self.stop_engine()
            self.procs.stop(self.proc)
        subprocess.run(["systemctl", "--user", "stop", self.unit], capture_output=True, check=False)


def engine_cmd() -> list[str]:
    return [PY, str(BENCH / "upstream.py"), "--events", str(EVENTS)]


def task_switches(pid: int) -> dict[str, int]:
    """Context switches (voluntary + not) of each thread of `pid`."""
    counts: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            n = 0
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    n += int(line.split()[1])
            counts[task.name] = n
    return counts


def rss_mb(pid: int) -> tuple[float, float]:
    f = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(f["VmRSS"].split()[0]) / 1024, int(f["VmHWM"].split()[0]) / 1024


def wakeups(pid: int, seconds: float) -> float:
    """Wake-ups per second: the growth of every thread's switch count; a
    thread that exited meanwhile counts one, one that appeared all of its."""
    a = task_switches(pid)
    time.sleep(seconds)
    b = task_switches(pid)
    n = sum(v - a.get(t, 0) for t, v in b.items()) + sum(1 for t in a if t not in b)
    return n / seconds


def processes_matching(*needles: str) -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if any(n in cmd for n in needles):
                found.append(f"{d.name}: {cmd.strip()}")
    return found


# Long enough to see the idle timer as installed (every 30 s) fire at least once.
FULLY_IDLE_WINDOW_S = 35.0


def last_pid() -> int:
    """The last PID handed out in this PID namespace (the sandbox's): the
    difference over a window counts the processes (and threads) started."""
    return int(Path("/proc/loadavg").read_text().split()[-1])


def processes_per_hour_fully_idle(window_s: float) -> tuple[float, str]:
    """The gateway as scripts/install sets it up, in this sandbox's user
    manager: one request starts the engine, the engine is stopped, the shim
    exits by itself; then count the processes started over `window_s`."""
    home = Path(os.environ["HOME"])
    units = home / ".config" / "systemd" / "user"
    port, engine_port = free_port(), free_port()
    subprocess.run([str(REPO / "scripts" / "install"), "--venv", str(Path(PY).parent.parent), "--no-pip"],
                   check=True, capture_output=True)
    (units / "vllm-gateway.socket.d").mkdir(parents=True, exist_ok=True)
    (units / "vllm-gateway.socket.d" / "bench.conf").write_text(
        f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    (home / ".config" / "vllm-gateway" / "config.toml").write_text(
        '[gateway]\nexit_after = "1s"\n'
        f"[engines.main]\ncommand = {json.dumps(engine_cmd())}\nport = {engine_port}\n"
        'models = ["bench"]\nstart_timeout = "60s"\n'
    )

    def systemctl(*args: str) -> str:
        return subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True).stdout.strip()

    def wait(what: str, cond: Any) -> None:
        deadline = time.monotonic() + 60
        while not cond():
            if time.monotonic() > deadline:
                raise RuntimeError(f"fully idle: timed out waiting for {what}")
            time.sleep(0.1)

    systemctl("daemon-reload")
    systemctl("enable", "--now", "vllm-gateway.socket")
    try:
        status, body = call(port, "POST", "/v1/chat/completions",
                            {"model": "bench", "messages": [{"role": "user", "content": "hi"}]}, 60)
        if status != 200:
            raise RuntimeError(f"fully idle: the first request answered {status}: {body[:200]!r}")
        systemctl("stop", "vllm.service")
        wait("the shim's exit", lambda: systemctl("is-active", "vllm-gateway.service") != "active")
        wait("the idle timer to stop", lambda: systemctl("is-active", "vllm-gateway-idle.timer") != "active")
        running = systemctl("list-units", "--state=active", "--plain", "--no-legend", "vllm*")
        before = last_pid()
        time.sleep(window_s)
        started = last_pid() - before
    finally:
        systemctl("disable", "--now", "vllm-gateway.socket")
        systemctl("stop", "vllm-gateway.service", "vllm.service")
    return started * 3600 / window_s, " ".join(line.split()[0] for line in running.splitlines())


# ---------------------------------------------------------------------------
# Cold start


async def _health_poller(port: int, interval_s: float) -> tuple[float, float]:
    """Poll the engine's /health until 200: (last time it was not ready, time of the 200)."""
    last_not_ready = time.perf_counter()
    req = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    while True:
        t = time.perf_counter()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(req)
            line = await r.readline()
            w.close()
            if line.startswith(b"HTTP/1.1 200"):
                return last_not_ready, time.perf_counter()
        except OSError:
            pass
        last_not_ready = t
        await asyncio.sleep(interval_s)


async def _first_byte(port: int) -> tuple[float, float, bytes]:
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]}).encode()
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    first = await r.read(1)
    t1 = time.perf_counter()
    rest = await r.read()
    w.close()
    return t0, t1, first + rest


async def cold_once(shim: Shim, interval_s: float) -> dict[str, float]:
    poller = asyncio.create_task(_health_poller(shim.engine_port, interval_s))
    t0, t_fb, resp = await _first_byte(shim.port)
    not_ready, ready = await asyncio.wait_for(poller, 10)
    if not resp.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"cold request answered {resp[:200]!r}")
    return {"lag_hi_ms": (t_fb - not_ready) * 1000, "lag_lo_ms": (t_fb - ready) * 1000, "total_s": t_fb - t0}


# ---------------------------------------------------------------------------
# Report


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "systemd": subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout.split(
            "\n"
        )[0],
    }


def fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def peer_table(res: dict[str, dict[str, float]]) -> list[str]:
    d, p = res.get("direct", {}), res.get("socket-proxyd", {})
    rows = [
        "| peer | req/s @32 | vs direct | vs proxyd | p50 @1 ms | p99 @1 ms | p50 @32 ms | p99 @32 ms "
        "| events/s @64 | vs direct | vs proxyd | first event p50 @1 ms "
        "| first event p50/p99 @64 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in PEERS:
        r = res.get(name)
        if not r:
            rows.append(f"| {name} | not measured | | | | | | | | | | | | |")
            continue
        rows.append(
            f"| {name} | {fmt(r['rps32'])} | {ratio(r['rps32'], d.get('rps32'))} "
            f"| {ratio(r['rps32'], p.get('rps32'))} | {fmt(r['p50_1'], 3)} | {fmt(r['p99_1'], 3)} "
            f"| {fmt(r['p50_32'], 2)} | {fmt(r['p99_32'], 2)} | {fmt(r['eps64'])} "
            f"| {ratio(r['eps64'], d.get('eps64'))} | {ratio(r['eps64'], p.get('eps64'))} "
            f"| {fmt(r['ttfe_p50_1'], 3)} | {fmt(r['ttfe_p50_64'], 1)} / {fmt(r['ttfe_p99_64'], 1)} "
            f"| {fmt(r['errors'])} |"
        )
    return rows


def cpu_table(res: dict[str, dict[str, float]]) -> list[str]:
    """Each proxy's own CPU time per request and per stream (user + system):
    what the throughput figures cost, steadier than they are on a shared machine."""
    p = res.get("socket-proxyd", {})
    rows = [
        "| peer | CPU µs per request @32 | vs proxyd | CPU µs per stream @64 | vs proxyd |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in PEERS[1:]:
        r = res.get(name, {})
        if "cpu_req" not in r and "cpu_stream" not in r:
            continue
        req, stream = r.get("cpu_req"), r.get("cpu_stream")
        rows.append(
            f"| {name} | {fmt(req) if req else '-'} | {ratio(req, p.get('cpu_req')) if req else '-'} "
            f"| {fmt(stream) if stream else '-'} | {ratio(stream, p.get('cpu_stream')) if stream else '-'} |"
        )
    return rows


def paced_table(res: dict[str, dict[str, float]]) -> list[str]:
    """The paced streams: throughput against what the engine offered, CPU per
    event, and the delay each event gained on the way (engine's write to the
    client's read)."""
    p = res.get("socket-proxyd", {})
    rows = [
        "| peer | streams | events/s | of offered | CPU µs per event | vs proxyd | % of a core "
        "| delay p50 ms | delay p99 ms | p99 of first events / later ms | delay max ms "
        "| first event p50 / p99 ms | errors | stalls |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in PACED_STREAMS:
        for name in PEERS:
            r = res.get(name, {})
            k = f"p{n}_"
            if k + "events_per_s" not in r:
                rows.append(f"| {name} | {n} | not measured | | | | | | | | | | | |")
                continue
            cpu = r.get(k + "cpu_us_per_event")
            core = r.get(k + "cpu_core_pct")
            rows.append(
                f"| {name} | {n} | {fmt(r[k + 'events_per_s'])} "
                f"| {r[k + 'events_per_s'] / r[k + 'offered_per_s']:.0%} "
                f"| {fmt(cpu, 1) if cpu else '-'} "
                f"| {ratio(cpu, p.get(k + 'cpu_us_per_event')) if cpu else '-'} "
                f"| {f'{core:.0f} %' if core else '-'} "
                f"| {fmt(r[k + 'delay_p50_ms'], 2)} | {fmt(r[k + 'delay_p99_ms'], 2)} "
                f"| {fmt(r.get(k + 'first_delay_p99_ms'), 2)} / {fmt(r.get(k + 'later_delay_p99_ms'), 2)} "
                f"| {fmt(r[k + 'delay_max_ms'], 1)} "
                f"| {fmt(r[k + 'ttfe_p50_ms'], 2)} / {fmt(r[k + 'ttfe_p99_ms'], 1)} "
                f"| {fmt(r[k + 'errors'])} | {fmt(r[k + 'stalls'])} |"
            )
    return rows


def _windows(r: dict[str, float], n: int) -> list[float]:
    """Each window's delay p99 at `n` paced streams (see `combine_windows`)."""
    out: list[float] = []
    while f"p{n}_window{len(out)}_p99_ms" in r:
        out.append(r[f"p{n}_window{len(out)}_p99_ms"])
    return out


def paced_targets(res: dict[str, dict[str, float]]) -> list[tuple[str, str, str, bool | None]]:
    """CPU per event against socket-proxyd's, and the delay p99, at each
    number of paced streams, rewriting off and on."""
    p = res.get("socket-proxyd", {})
    out: list[tuple[str, str, str, bool | None]] = []
    limits = (("vllm-gateway", "rewrite off", 2.0), ("vllm-gateway+rewrite", "rewrite on", 2.5))
    for name, what, most in limits:
        g = res.get(name, {})
        for n in PACED_STREAMS:
            key = f"p{n}_cpu_us_per_event"
            label = f"CPU per event vs socket-proxyd @{n} paced streams ({what})"
            if not g.get(key) or not p.get(key):
                out.append((label, f"<= {most:g}x", "-", None))
                continue
            x = g[key] / p[key]
            out.append((label, f"<= {most:g}x", f"{x:.2f}x", x <= most))
    # what the proxy adds: its p99 less direct's (the engine's and the client's own)
    d = res.get("direct", {})
    for name, what in (("vllm-gateway", "rewrite off"), ("vllm-gateway+rewrite", "rewrite on")):
        g = res.get(name, {})
        for n, below in zip(PACED_STREAMS, (1.0, 5.0), strict=True):
            key = f"p{n}_delay_p99_ms"
            v, floor = g.get(key), d.get(key)
            label = f"delay added p99 @{n} paced streams ({what})"
            if v is None or floor is None:
                out.append((label, f"< {below:g} ms", "-", None))
                continue
            if v < floor:  # the machine was busier while direct ran: no reading of the gateway's share
                out.append((label, f"< {below:g} ms", f"- (direct's own {floor:.2f} over the gateway's "
                            f"{v:.2f}: rerun on a quieter machine)", None))
                continue
            each = " / ".join(f"{w:.2f}" for w in _windows(g, n))
            windows = f"; windows {each}" if each else ""
            measured = f"{v - floor:.2f} ms ({v:.2f} less direct's {floor:.2f}{windows})"
            out.append((label, f"< {below:g} ms", measured, v - floor < below))
    return out


def targets(
    res: dict[str, dict[str, float]], extra: dict[str, Any]
) -> list[tuple[str, str, str, bool | None]]:
    g, gr = res.get("vllm-gateway", {}), res.get("vllm-gateway+rewrite", {})
    f, p, d = res.get("fastapi+httpx", {}), res.get("socket-proxyd", {}), res.get("direct", {})

    def rel(
        a: dict[str, float], b: dict[str, float], key: str, want: float, what: str
    ) -> tuple[str, str, str, bool | None]:
        if key not in a or key not in b or not b[key]:
            return (what, f">= {want:g}x", "-", None)
        x = a[key] / b[key]
        return (
            what,
            f">= {want:g}x" if want >= 1 else f">= {want:.0%}",
            f"{x:.2f}x" if want >= 1 else f"{x:.0%}",
            x >= want,
        )

    out = [
        rel(g, f, "rps32", 10, "req/s vs fastapi+httpx (rewrite off)"),
        rel(gr, f, "rps32", 10, "req/s vs fastapi+httpx (rewrite on)"),
        rel(g, f, "eps64", 10, "events/s vs fastapi+httpx (rewrite off)"),
        rel(gr, f, "eps64", 10, "events/s vs fastapi+httpx (rewrite on)"),
        rel(g, p, "rps32", 0.25, "req/s vs socket-proxyd (rewrite off)"),
        rel(g, p, "eps64", 0.5, "events/s vs socket-proxyd (rewrite off)"),
        rel(gr, p, "eps64", 0.3, "events/s vs socket-proxyd (rewrite on)"),
        *paced_targets(res),
    ]
    if "p50_1" in g and "p50_1" in d:
        added = g["p50_1"] - d["p50_1"]
        out.append(("added p50 latency @1 conn over direct", "< 0.300 ms", f"{added:.3f} ms", added < 0.3))
    cold = extra.get("cold_p99_hi_ms")
    out.append(
        (
            "cold-start lag p99 (upper bound)",
            "< 100 ms",
            f"{cold:.1f} ms" if cold is not None else "-",
            None if cold is None else cold < 100,
        )
    )
    rss = extra.get("rss_mb")
    out.append(
        (
            "shim RSS after load",
            "< 30 MB",
            f"{rss:.1f} MB" if rss is not None else "-",
            None if rss is None else rss < 30,
        )
    )
    idle = extra.get("rss_idle_mb")
    out.append(
        (
            f"shim RSS idle, after {PACED_STREAMS[-1]} paced streams too",
            "< 30 MB",
            f"{idle:.1f} MB" if idle is not None else "-",
            None if idle is None else idle < 30,
        )
    )
    for key, what in (
        ("wake_ready", "idle wake-ups/s, engine ready"),
        ("wake_stopped", "idle wake-ups/s, engine stopped"),
    ):
        w = extra.get(key)
        out.append((what, "0 /s", f"{w:.2f} /s" if w is not None else "-", None if w is None else w == 0))
    per_hour = extra.get("idle_per_hour")
    out.append(
        (
            "processes started per hour, fully idle",
            "0",
            f"{per_hour:.0f}" if per_hour is not None else "-",
            None if per_hour is None else per_hour == 0,
        )
    )
    left = extra.get("left")
    out.append(
        (
            "processes left when fully idle",
            "0",
            str(len(left)) if left is not None else "-",
            None if left is None else not left,
        )
    )
    return out


def target_rows(ts: list[tuple[str, str, str, bool | None]]) -> list[str]:
    rows = ["| target | wanted | measured | |", "|---|---|---|---|"]
    for what, want, got, ok in ts:
        rows.append(f"| {what} | {want} | {got} | {'PASS' if ok else 'MISS' if ok is False else 'n/a'} |")
    return rows


def plots(res: dict[str, dict[str, float]], extra: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is missing: no plots")
        return []
    names = [n for n in PEERS if n in res]
    colors = ["#777777", "#4c72b0", "#dd8452", "#55a868", "#8fbc8f"][: len(names)]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    for a, key, title in (
        (ax[0], "rps32", "non-streaming requests/s, 32 connections"),
        (ax[1], "eps64", "SSE events/s, 64 streams"),
    ):
        vals = [res[n][key] for n in names]
        a.bar(names, vals, color=colors)
        a.set_title(title)
        a.tick_params(axis="x", labelrotation=20)
        for i, v in enumerate(vals):
            a.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench-throughput.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    x = range(len(names))
    w = 0.38
    ax[0].bar([i - w / 2 for i in x], [res[n]["p50_1"] for n in names], w, label="p50")
    ax[0].bar([i + w / 2 for i in x], [res[n]["p99_1"] for n in names], w, label="p99")
    ax[0].set_xticks(list(x), names, rotation=20)
    ax[0].set_ylabel("ms")
    ax[0].set_title("latency, 1 connection (non-streaming)")
    ax[0].legend()
    lags = extra.get("cold_lags_hi_ms") or []
    if lags:
        ax[1].hist(lags, bins=min(20, max(3, len(lags))), color="#55a868")
        ax[1].axvline(100, color="red", linestyle="--", label="target 100 ms")
        ax[1].legend()
    ax[1].set_xlabel("ms (upper bound)")
    ax[1].set_title(f"cold-start lag: engine /health 200 -> first byte ({len(lags)} starts)")
    fig.tight_layout()
    fig.savefig(out / "bench-latency.png", dpi=110)
    plt.close(fig)
    return ["bench-throughput.png", "bench-latency.png"]


# ---------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(REPO / "docs"))
    ap.add_argument("--command", default="scripts/bench", help="the command line to record")
    ap.add_argument("--upstream-procs", type=int, default=1)
    ap.add_argument("--no-wrk", action="store_true", help="use bench/load.py for non-streaming too")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="record py-spy profiles of the shim under load into OUT/profiles",
    )
    a = ap.parse_args()
    d = QUICK if a.quick else FULL
    out = Path(a.out)
    if not out.is_absolute():
        out = REPO / out
    out.mkdir(parents=True, exist_ok=True)
    use_wrk = not a.no_wrk and shutil.which("wrk") is not None
    if not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        log("no session bus: run me through scripts/bench (the shim needs a systemd user manager)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="vllm-gateway-bench."))
    procs = Procs(work)
    started = time.monotonic()
    res: dict[str, dict[str, float]] = {}
    extra: dict[str, Any] = {}
    notes: list[str] = []
    shims: list[Shim] = []
    try:
        up_port = free_port()
        procs.start("upstream", [*engine_cmd(), "--port", str(up_port), "--procs", str(a.upstream_procs)])
        wait_port(up_port)

        paced_peers: list[PacedPeer] = []

        def peer(name: str, port: int, tools: bool = False, pid: int | None = None) -> None:
            """The peer's own figures; its paced streams wait for the rounds."""
            log(f"measuring {name}")
            try:
                res[name] = measure(port, d, use_wrk, tools, pid)
                if name == "vllm-gateway" and pid:  # the footprint of the load before, as always
                    extra["rss_mb"], extra["rss_peak_mb"] = rss_mb(pid)
                paced_peers.append(PacedPeer(name, port, tools, pid))
            except Exception as e:  # a peer that fails leaves a gap, not a crashed run
                log(f"{name} failed: {e}")
                notes.append(f"{name}: not measured: {e}")

        peer("direct", up_port)

        pp = free_port()
        proxyd = procs.start(
            "proxyd", ["systemd-socket-activate", "-l", f"127.0.0.1:{pp}", PROXYD, f"127.0.0.1:{up_port}"]
        )
        wait_port(pp)
        peer("socket-proxyd", pp, pid=proxyd.pid)

        fp = free_port()
        fa = procs.start(
            "fastapi",
            [
                PY,
                str(BENCH / "peers" / "fastapi_gateway.py"),
                "--port",
                str(fp),
                "--upstream",
                f"http://127.0.0.1:{up_port}",
            ],
        )
        wait_port(fp)
        peer("fastapi+httpx", fp, pid=fa.pid)

        # The gateway, warm: its engine is the same stand-in, started by the shim.
        exit_after = d.idle_s + 4
        g = Shim(procs, work, "off", engine_cmd(), exit_after=f"{exit_after:g}s")
        shims.append(g)
        g.start()
        peer("vllm-gateway", g.port, pid=g.proc.pid if g.proc else None)
        pid = g.proc.pid if g.proc else 0
        gr = Shim(procs, work, "rewrite", engine_cmd(), fmt="nemotron")
        shims.append(gr)
        gr.start()
        peer("vllm-gateway+rewrite", gr.port, tools=True, pid=gr.proc.pid if gr.proc else None)

        for name, paced_res in paced_rounds(paced_peers, d, notes).items():
            res[name].update(paced_res)
        procs.stop(proxyd)
        procs.stop(fa)
        spy_bin = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")

        def profile(shim: Shim, tools: bool) -> None:
            """py-spy profiles of a shim under the 32-connection, 64-stream and paced loads."""
            if not a.profile or not Path(spy_bin).exists() or shim.proc is None:
                return
            profile_dir = out / "profiles"
            profile_dir.mkdir(exist_ok=True)
            for mode, conns in (("chat", 32), ("stream", 64), ("paced", PACED_STREAMS[-1])):
                folded = profile_dir / f"shim-{shim.name}-{mode}.folded.txt"
                spy = procs.start(
                    f"py-spy-{shim.name}-{mode}",
                    [spy_bin, "record", "-p", str(shim.proc.pid), "-d", "6", "-r", "200", "-f", "raw",
                     "-o", str(folded)],
                )
                loadpy(mode, f"http://127.0.0.1:{shim.port}", conns, 6, 0.2, tools=tools)
                spy.wait(30)

        profile(g, tools=False)
        profile(gr, tools=True)
        gr.stop()
        extra["rss_paced_mb"], extra["rss_paced_peak_mb"] = rss_mb(pid)
        time.sleep(0.5)
        log(f"idle footprint: engine ready, {d.idle_s:g} s")
        extra["wake_ready"] = wakeups(pid, d.idle_s)
        g.stop_engine()
        time.sleep(0.3)
        log(f"idle footprint: engine stopped, {d.idle_s:g} s")
        extra["wake_stopped"] = wakeups(pid, d.idle_s)
        extra["rss_idle_mb"] = rss_mb(pid)[0]
        assert g.proc is not None
        try:
            g.proc.wait(exit_after + 10)
            extra["shim_exit"] = (
                f"exited by itself (exit_after = {exit_after:g}s), status {g.proc.returncode}"
            )
        except subprocess.TimeoutExpired:
            extra["shim_exit"] = "did not exit by itself"
        time.sleep(0.5)
        extra["left"] = processes_matching(f"{g.name}.toml", f"--port {g.engine_port}")
        unit_state = subprocess.run(
            ["systemctl", "--user", "is-active", g.unit], capture_output=True, text=True
        ).stdout.strip()
        extra["unit_state"] = unit_state

        # Cold start: fake-vllm, 2 s to get ready; the shim polls its /health.
        log(f"cold starts: {d.cold_runs}")
        cold = Shim(
            procs,
            work,
            "cold",
            [PY, str(REPO / "scripts" / "fake-vllm"), "--startup-delay", "2", "--served-model-name", "bench"],
        )
        shims.append(cold)
        cold.start()
        lags: list[dict[str, float]] = []
        for i in range(d.cold_runs):
            try:
                lags.append(asyncio.run(cold_once(cold, 0.001)))
            except Exception as e:
                notes.append(f"cold start {i}: {e}")
            cold.stop_engine()
        cold.stop()
        if lags:
            hi = sorted(x["lag_hi_ms"] for x in lags)
            lo = sorted(x["lag_lo_ms"] for x in lags)

            def pct(xs: list[float], q: float) -> float:
                return xs[min(len(xs) - 1, max(0, round(q * len(xs) + 0.5) - 1))]

            extra.update(
                cold_runs=len(lags),
                cold_lags_hi_ms=hi,
                cold_p50_hi_ms=pct(hi, 0.5),
                cold_p99_hi_ms=pct(hi, 0.99),
                cold_p50_lo_ms=pct(lo, 0.5),
                cold_p99_lo_ms=pct(lo, 0.99),
                cold_total_p50_s=sorted(x["total_s"] for x in lags)[len(lags) // 2],
            )

        window = FULLY_IDLE_WINDOW_S
        log(f"fully idle, as installed: {window:g} s")
        extra["idle_per_hour"], extra["idle_units"] = processes_per_hour_fully_idle(window)
    except Exception as e:  # print and record what was measured; figures never fail the run
        log(f"run stopped early: {type(e).__name__}: {e}")
        notes.append(f"run stopped early: {type(e).__name__}: {e}")
    finally:
        for s in shims:
            s.stop()
        procs.stop_all()

    elapsed = time.monotonic() - started
    pt = peer_table(res)
    ct = cpu_table(res)
    pct_ = paced_table(res)
    ts = targets(res, extra)
    tt = target_rows(ts)
    print("\n".join(pt))
    print()
    print("\n".join(ct))
    print()
    print("\n".join(pct_))
    print()
    print("\n".join(tt))
    for n in notes:
        print(f"note: {n}")
    images = plots(res, extra, out)
    write_doc(out / "benchmarks.md", a, d, use_wrk, pt, ct, pct_, tt, extra, notes, images, elapsed)
    log(f"wrote {out / 'benchmarks.md'} in {elapsed:.0f} s")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def write_doc(
    path: Path,
    a: argparse.Namespace,
    d: Durations,
    use_wrk: bool,
    pt: list[str],
    ct: list[str],
    pct_: list[str],
    tt: list[str],
    extra: dict[str, Any],
    notes: list[str],
    images: list[str],
    elapsed: float,
) -> None:
    m = machine()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    chat_tool = "wrk -t1 (bench/chat.lua)" if use_wrk else "bench/load.py chat"
    cold = ""
    if extra.get("cold_runs"):
        cold = (
            f"- cold-start lag over {extra['cold_runs']} starts: p50 {extra['cold_p50_hi_ms']:.1f} ms, "
            f"p99 {extra['cold_p99_hi_ms']:.1f} ms (upper bounds; lower bounds p50 "
            f"{extra['cold_p50_lo_ms']:.1f} ms, p99 {extra['cold_p99_lo_ms']:.1f} ms); whole cold request "
            f"p50 {extra['cold_total_p50_s']:.2f} s\n"
        )
    left = extra.get("left")
    lines = [
        "# Benchmarks",
        "",
        "What `scripts/bench` measured: vllm-gateway's proxying against a plain TCP relay, the "
        "FastAPI + httpx design it replaced, and no proxy at all, all in front of the same stand-in "
        "engine; and the gateway's cold-start lag and idle footprint. Figures, not pass/fail: the "
        "targets are there to read against.",
        "",
        f"- date: {now}",
        f"- command: `{a.command}`",
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), kernel {m['kernel']}, Python {m['python']}, "
        f"{m['systemd']}",
        f"- run time: {elapsed:.0f} s; windows: {d.chat32:g} s at 32 connections, {d.chat1:g} s at 1, "
        f"{d.stream64:g} s at 64 streams, {d.stream1:g} s at 1 stream, {d.paced_windows} x {d.paced:g} s "
        "at each number of paced streams",
        "- the machine was shared: other work ran on its 2 cores at the same time, so absolute figures "
        "move between runs; the ratios within one run are what the targets read",
        "",
        "## Proxying",
        "",
        *pt,
        "",
        "Each proxy's own CPU time (user + system, from /proc) per request at 32 connections and per "
        f"{EVENTS}-event stream at 64: the cost behind the throughput above, and the steadier figure when "
        "other work shares the machine.",
        "",
        *ct,
        "",
        "## Paced streams",
        "",
        f"The engine writes each event as its own chunk, {PACED_INTERVAL_MS:g} ms apart on every stream "
        f"({PACED_EVENTS} events a stream), as a GPU decodes: the relay pays one wake-up, one read and one "
        "write per event. Offered: "
        + ", ".join(f"{n} streams = {n * 1000 / PACED_INTERVAL_MS:,.0f} events/s" for n in PACED_STREAMS)
        + ". Delay: from the engine's write (its send time is in the event) to the client's read; "
        "`direct` is the floor that the engine and the client themselves add on this machine; "
        "each stream's first event (it waits for the proxy's work on the request and the engine's "
        "answer head) and the events after it (the relay alone) also have their own p99. "
        "CPU: the proxy's own (user + system, from /proc) over the window, per event and as a share "
        "of one core. "
        + (f"Each peer runs {d.paced_windows} windows of {d.paced:g} s at each number of streams, in "
           "rounds: a round is one window of every peer in turn (direct first), each once the machine "
           "is idle again. A row holds the medians of a peer's windows (max: the largest, "
           "errors and stalls: the sum), so that a minute of other work on the machine moves one window "
           "of every peer, not the reading, and the figures compared come from the same moments. "
           if d.paced_windows > 1 else "")
        + "The targets read the delay a proxy adds as its p99 less direct's.",
        "",
        *pct_,
        "",
        "## Targets",
        "",
        *tt,
        "",
        "## Footprint and cold start",
        "",
        f"- shim RSS: {extra.get('rss_mb', 0):.1f} MB after load "
        f"(peak {extra.get('rss_peak_mb', 0):.1f} MB), "
        f"{extra.get('rss_idle_mb', 0):.1f} MB idle with the engine stopped; "
        f"{extra.get('rss_paced_mb', 0):.1f} MB after the paced streams too "
        f"(peak {extra.get('rss_paced_peak_mb', 0):.1f} MB: {PACED_STREAMS[-1]} client and "
        f"{PACED_STREAMS[-1]} engine connections at once)",
        f"- shim wake-ups (context switches of all its threads) while idle: "
        f"{extra.get('wake_ready', float('nan')):.2f}/s with the engine ready, "
        f"{extra.get('wake_stopped', float('nan')):.2f}/s with it stopped ({d.idle_s:g} s each)",
        f"- shim: {extra.get('shim_exit', '-')}; engine unit afterwards: {extra.get('unit_state', '-')}; "
        f"processes left: {len(left) if left is not None else '-'}"
        + ("" if not left else " (" + "; ".join(left) + ")"),
        f"- fully idle, as installed (the engine stopped, the shim gone): "
        f"{extra.get('idle_per_hour', float('nan')):.0f} processes started per hour; the gateway's units "
        f"still active: {extra.get('idle_units') or '-'}",
        cold.rstrip("\n"),
        "",
        *[f"![{i}]({i})" for i in images],
        "",
        "## How it was measured",
        "",
        "- **Upstream** (`bench/upstream.py`): one asyncio process answering from bytes rendered "
        "at start-up: "
        f"a ~480-byte chat.completion, or a stream of {EVENTS} SSE events (vLLM's chat.completion.chunk "
        "shape, each its own HTTP chunk, `data: [DONE]` last) written at once, no pacing. `direct`, "
        "`socket-proxyd` and `fastapi+httpx` share one instance; each vllm-gateway starts its own instance "
        "of the same program as its engine, through systemd.",
        "- **Peers**: `systemd-socket-activate -l ADDR /lib/systemd/systemd-socket-proxyd UPSTREAM`; "
        "`bench/peers/fastapi_gateway.py` (FastAPI on uvicorn, one shared httpx.AsyncClient, "
        "`send(stream=True)` into a StreamingResponse); vllm-gateway run by hand (`vllm-gateway --config "
        "... serve`, listening on `[gateway] listen`, log on a file) inside `scripts/sandbox`, whose "
        "systemd user manager runs the engine as a transient unit; warmed with one whole and one streamed "
        "completion (which also check that the stream arrives intact: all events, [DONE] last). "
        '`+rewrite` is `tool_call_format = "nemotron"` with a tool offered in every request (the gateway '
        "rewrites only responses to requests that offer tools) and answers without tool calls: the "
        "cost of looking.",
        f"- **Non-streaming**: {chat_tool}, keep-alive; requests/s at 32 connections, latency percentiles "
        "at 1 and 32 connections (request sent to response complete).",
        "- **Streaming**: `bench/load.py stream`, 64 keep-alive connections each streaming one completion "
        "after another; events/s counts `data:` lines of completed streams; first event = request sent "
        "to the first byte of the first event, at 1 and at 64 streams (at 64 it is mostly queueing).",
        f"- **Paced streams**: `bench/load.py paced` with `x-bench-pace: {PACED_EVENTS}/"
        f"{PACED_INTERVAL_MS:g}`, which the stand-in engine answers on a fixed schedule from the "
        "request's arrival, stamping each event with CLOCK_MONOTONIC at its write; the connections "
        "start spread over one interval, each streaming one completion after another (so their "
        "streams end and start again in waves; `bench/load.py --starts spread` spreads the starts "
        "over a whole stream instead). Events are counted when they arrive within the window. "
        "Errors: a status other than 200, a stream cut short or with the wrong number of events. "
        "Stalls: a gap of over 100 ms between two events of a stream (or before its first). "
        "`+rewrite` offers a tool, as above.",
        "- **Cold-start lag**: the engine is `scripts/fake-vllm --startup-delay 2`, which opens its port "
        "only when ready. With the engine stopped, one client sends a chat completion to the gateway "
        "while another polls the engine's `/health` directly every 1 ms. The engine became ready after "
        "the last poll that failed and before the first that got 200; the lag is the time from then to "
        "the first response byte at the client. The table gives the upper bound (from the last failed "
        "poll); the lower bound (from the first 200) is within ~1-2 ms of it. fake-vllm's log stamps "
        "have 1 s resolution, too coarse to use. The shim itself polls /health every "
        "50 ms (shim/engine.py HEALTH_POLL_S), which bounds this lag from below on average.",
        "- **Idle footprint**: VmRSS/VmHWM of the shim process (started with the installed unit's "
        "`Environment=` lines, `PYTHONOPTIMIZE=2` among them, as it runs for its users); "
        "wake-ups = growth of voluntary+nonvoluntary context switches over all its threads "
        "(/proc/PID/task/*/status) across "
        "the idle window, first with the engine ready and no request, then after `POST /gateway/stop`. "
        "Processes left: after the shim exited by itself (`exit_after`), any process whose command "
        "line names its config or its engine's port.",
        "- **Fully idle, as installed**: `scripts/install` in the sandbox's user manager (the socket "
        "enabled, the idle timer as shipped), one request to start the engine, `systemctl --user stop "
        f"vllm.service`, the shim's exit (`exit_after`); then the PIDs handed out in the sandbox's PID "
        f"namespace (/proc/loadavg) over {FULLY_IDLE_WINDOW_S:g} s, longer than the timer's 30 s period, "
        "scaled to an hour.",
        "- The FastAPI + httpx peer is slower at 32 connections than at 1 to 4 (about 550-650 req/s there "
        "on this machine): httpx's connection pool costs more as concurrency grows. That is the design "
        "as it was used, so it stays the yardstick.",
        "- `scripts/bench --profile` also records py-spy profiles (folded stacks) of both shims "
        f"(rewriting off and on) under the 32-connection, 64-stream and {PACED_STREAMS[-1]} paced-stream "
        "loads into OUT/profiles.",
        "- Everything runs on the same machine as the load client: on a small machine the client, the "
        "peer and the upstream share the CPUs, so absolute figures are low and ratios taken within one "
        "run are what to compare.",
    ]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    # the record of what was tried to make the relay faster, kept by hand
    tried = Path(__file__).with_name("tried.md")
    if tried.exists():
        lines += ["", tried.read_text().rstrip()]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
