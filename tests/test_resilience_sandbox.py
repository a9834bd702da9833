"""Faults the gateway must survive with no client noticing more than it must:
the shim killed under load, systemd re-executed, the idle threshold hammered,
clients vanishing by the thousand, and every stop leaving no process behind."""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.gatewaying import Gateway, wait_until
from tests.reliability_report import record
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

SHIM = "vllm-gateway.service"
ENGINE = "vllm.service"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "fake_reply": "ok"}


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    yield Gateway(sandbox, timer_every_s=1)


@dataclass
class Attempt:
    started: float
    ended: float
    outcome: str  # "ok", "status NNN", or the exception's class name


def attempt(gw: Gateway, body: dict[str, object] = CHAT, timeout_s: float = 60) -> Attempt:
    started = time.monotonic()
    try:
        code, _, _ = gw.request("POST", "/v1/chat/completions", body, timeout_s=timeout_s)
        outcome = "ok" if code == 200 else f"status {code}"
    except (OSError, http.client.HTTPException) as e:
        outcome = type(e).__name__
    return Attempt(started, time.monotonic(), outcome)


def main_pid(gw: Gateway, unit: str) -> int:
    return int(gw.unit_prop(unit, "MainPID") or 0)


# ---- cgroups ----


CGROUP_ROOTS = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup")


def engine_cgroup(gw: Gateway) -> str:
    """The path of the running engine's cgroup.procs inside the sandbox."""
    group = gw.unit_prop(ENGINE, "ControlGroup")
    assert group, f"{ENGINE} has no control group"
    for root in CGROUP_ROOTS:  # hybrid hierarchy (named v1 tree), then pure cgroup2
        path = f"{root}{group}/cgroup.procs"
        done = gw.sb.run(["cat", path], check=False)
        if done.returncode == 0 and done.stdout.strip():
            return path
    raise AssertionError(f"no cgroup.procs for {group} inside the sandbox")


def cgroup_procs(gw: Gateway, path: str) -> list[int]:
    """The processes left in a cgroup; a removed cgroup holds none."""
    done = gw.sb.run(["cat", path], check=False)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


# ---- the shim killed under load ----


def test_shim_killed_under_load_is_restarted_refuses_nobody_and_adopts_the_engine(
    gw: Gateway, request: pytest.FixtureRequest,
) -> None:
    gw.configure(["--startup-delay", "1", "--token-interval-ms", "5"], stop_timeout="2s")
    assert gw.request("POST", "/v1/chat/completions", CHAT)[0] == 200
    engine_before, shim_before = main_pid(gw, ENGINE), main_pid(gw, SHIM)
    assert engine_before and shim_before
    attempts: list[Attempt] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        body = {**CHAT, "fake_reply": "a few words to take some time " * 3}
        while not stop.is_set():
            a = attempt(gw, body)
            with lock:
                attempts.append(a)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(4)
    kill_from = time.monotonic()
    gw.sb.systemctl("kill", "--signal=SIGKILL", SHIM)
    kill_to = time.monotonic()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(90)

    before = [a for a in attempts if a.started < kill_from and a.ended <= kill_from]
    around = [a for a in attempts if a.started < kill_to and a.ended > kill_from]
    after = [a for a in attempts if a.started >= kill_to]
    failed_around = [a.outcome for a in around if a.outcome != "ok"]
    record(request, "shim SIGKILL under load", clients=8, requests=len(attempts),
           before=len(before), in_flight_at_kill=len(around),
           in_flight_failed=len(failed_around), after=len(after),
           after_failed=sum(a.outcome != "ok" for a in after))
    assert not [a for a in attempts if a.outcome == "ConnectionRefusedError"], "a connection was refused"
    assert all(a.outcome == "ok" for a in before), Counter(a.outcome for a in before)
    assert after, "no request was made after the kill"
    assert all(a.outcome == "ok" for a in after), Counter(a.outcome for a in after)
    wait_until(lambda: gw.active(SHIM) == "active", 20, "the shim to be back")
    assert main_pid(gw, SHIM) != shim_before, "the shim was not restarted"
    assert main_pid(gw, ENGINE) == engine_before, "the engine was not adopted"
    assert gw.journal(ENGINE).count("Application startup complete") == 1


# ---- the idle threshold hammered ----


def test_requests_around_the_idle_threshold_are_all_answered(
    gw: Gateway, request: pytest.FixtureRequest,
) -> None:
    gw.configure(["--startup-delay", "1"], stop_after="2s", stop_timeout="2s")
    starts_before = gw.journal(ENGINE).count("Application startup complete")
    attempts: list[Attempt] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 30
    rng = random.Random(1234)
    # the same pauses for every client: requests come in bursts, and the gaps
    # between bursts straddle stop_after plus a timer period
    pauses = [[rng.uniform(1.5, 3.0) for _ in range(40)]] * 3

    def client(mine: list[float]) -> None:
        for pause in mine:
            if time.monotonic() > deadline:
                return
            a = attempt(gw, timeout_s=90)
            with lock:
                attempts.append(a)
            time.sleep(pause)

    threads = [threading.Thread(target=client, args=(p,)) for p in pauses]
    for t in threads:
        t.start()
    for t in threads:
        t.join(200)
    starts = gw.journal(ENGINE).count("Application startup complete") - starts_before
    outcomes = Counter(a.outcome for a in attempts)
    record(request, "idle threshold hammered", clients=3, requests=len(attempts),
           ok=outcomes["ok"], lost=len(attempts) - outcomes["ok"], engine_starts=starts,
           seconds=30)
    assert attempts and outcomes == Counter(ok=len(attempts)), outcomes
    assert starts >= 1


# ---- clients vanishing by the thousand ----


def shim_footprint(gw: Gateway) -> tuple[int, int]:
    """(VmRSS in kB, open fds) of the shim, read inside the sandbox."""
    pid = main_pid(gw, SHIM)
    assert pid, "the shim is not running"
    out = gw.sb.run(["sh", "-c", f"grep VmRSS /proc/{pid}/status; ls /proc/{pid}/fd | wc -l"]).stdout
    lines = out.split("\n")
    return int(lines[0].split()[1]), int(lines[1])


HEAD = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: {n}\r\n\r\n")


def vanish_mid_body(gw: Gateway, rst: bool) -> None:
    body = json.dumps({**CHAT, "pad": "x" * 400}).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s:
        if rst:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.sendall(HEAD.format(n=len(body)).encode() + body[: len(body) // 2])


def vanish_mid_stream(gw: Gateway, rst: bool) -> bool:
    """Send a streamed chat and leave after the first event; True if one came."""
    body = json.dumps({**CHAT, "stream": True, "fake_reply": "word " * 200}).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s:
        if rst:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.sendall(HEAD.format(n=len(body)).encode() + body)
        got = b""
        while b"data:" not in got and len(got) < 65536:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        return got.startswith(b"HTTP/1.1 200 ") and b"data:" in got


def vanish(gw: Gateway, n: int) -> int:
    """n clients, half leaving mid-body, half mid-stream; the streams that got an event."""
    def one(i: int) -> bool:
        if i % 2:
            return vanish_mid_stream(gw, rst=i % 4 == 1)
        vanish_mid_body(gw, rst=i % 4 == 0)
        return False

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(one, range(n)))


def test_thousands_of_vanishing_clients_leak_neither_memory_nor_fds(
    gw: Gateway, request: pytest.FixtureRequest,
) -> None:
    gw.configure(["--startup-delay", "1", "--token-interval-ms", "5"], stop_timeout="2s")
    assert gw.request("POST", "/v1/chat/completions", CHAT)[0] == 200

    def settled() -> bool:
        return bool(gw.status()["in_flight"] == 0)

    streamed = vanish(gw, 200)  # warm-up: buffers, caches and pools reach their size
    wait_until(settled, 30, "in_flight to come back to 0 after the warm-up")
    rss0, fds0 = shim_footprint(gw)
    started = time.monotonic()
    streamed += vanish(gw, 2000)
    took = time.monotonic() - started
    wait_until(settled, 30, "in_flight to come back to 0")
    time.sleep(1)
    rss1, fds1 = shim_footprint(gw)
    record(request, "vanishing clients", connections=2200, streams_cut=streamed,
           seconds=round(took, 1), rss_kb_before=rss0, rss_kb_after=rss1, fds_before=fds0,
           fds_after=fds1)
    assert streamed >= 1000, "too few streams got their first event"
    assert rss1 - rss0 < 10 * 1024, (rss0, rss1)
    assert fds1 - fds0 < 20, (fds0, fds1)
    assert gw.status()["in_flight"] == 0
    assert gw.request("POST", "/v1/chat/completions", CHAT)[0] == 200


# ---- every stop leaves no process ----


def stop_by_admin(gw: Gateway) -> None:
    assert gw.request("POST", "/gateway/stop")[0] == 200


def stop_by_systemctl(gw: Gateway) -> None:
    gw.sb.systemctl("stop", ENGINE)


def stop_by_idle_timer(gw: Gateway) -> None:
    wait_until(lambda: gw.active(ENGINE) != "active", 40, "the idle timer to stop the engine")


def stop_by_engine_crash(gw: Gateway) -> None:
    gw.sb.systemctl("kill", "--signal=SIGKILL", "--kill-whom=main", ENGINE)


@pytest.mark.parametrize("stop", [stop_by_admin, stop_by_systemctl, stop_by_idle_timer,
                                  stop_by_engine_crash], ids=lambda f: f.__name__)
def test_every_stop_leaves_no_process_of_the_engine(gw: Gateway, stop: object) -> None:
    idle = stop is stop_by_idle_timer
    gw.configure(["--startup-delay", "1", "--workers", "2", "--orphan-workers"],
                 stop_after="3s" if idle else "10m", stop_timeout="2s")
    assert gw.request("POST", "/v1/chat/completions", CHAT)[0] == 200
    path = engine_cgroup(gw)
    pids = cgroup_procs(gw, path)
    assert len(pids) >= 3, pids  # the engine and its two workers
    assert callable(stop)
    stop(gw)
    wait_until(lambda: gw.active(ENGINE) in ("inactive", "failed"), 30, "the engine to stop")
    wait_until(lambda: not cgroup_procs(gw, path), 10, "the engine's cgroup to empty")
    for pid in pids:
        assert not gw.alive_in_sandbox(pid), f"process {pid} of the engine outlived its unit"
    wait_until(lambda: gw.status()["state"] in ("stopped", "failed"), 10, "the shim to see the stop")
    assert gw.request("POST", "/v1/chat/completions", CHAT)[0] == 200  # and it starts again


# ---- systemd re-executed: last, it changes the manager itself ----


def test_shim_serves_and_follows_the_engine_after_daemon_reload_and_reexec(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1"], stop_timeout="2s")
    assert gw.request("POST", "/v1/chat/completions", CHAT)[0] == 200
    shim = main_pid(gw, SHIM)
    gw.sb.systemctl("daemon-reload")
    assert gw.request("POST", "/v1/chat/completions", CHAT)[0] == 200
    gw.sb.systemctl("daemon-reexec")
    wait_until(lambda: gw.active(SHIM) == "active", 20, "the manager to be back")
    assert gw.request("POST", "/v1/chat/completions", CHAT)[0] == 200
    assert main_pid(gw, SHIM) == shim, "the shim was restarted by the reexec"
    gw.sb.systemctl("stop", ENGINE)
    wait_until(lambda: gw.status()["state"] == "stopped", 10, "the shim to see the stop after a reexec")
    assert gw.request("POST", "/v1/chat/completions", CHAT)[0] == 200
    assert gw.active(ENGINE) == "active"
