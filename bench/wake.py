#!/usr/bin/env python3
"""Measure what the gateway adds to a request that has to wake a sleeping engine.

Run through scripts/bench-wake, which puts this inside scripts/sandbox: the
shim starts its engine through the systemd user manager that the sandbox
provides, and every process started here dies with the sandbox.

The engine is scripts/fake-vllm with sleep mode on. Each round:

1. `POST /gateway/sleep`, then poll `/gateway/status` until it says "sleeping";
2. time one small non-streamed chat completion through the gateway, from
   just before connecting to its first response byte: the *total*;
3. time the same request again, the engine now awake: the *awake baseline*;
4. against a second fake engine run directly (no gateway, same flags), time
   `POST /sleep` and then `POST /wake_up` to its first response byte: the
   engine's own *wake time*.

added = total - wake - awake baseline, per round: what the gateway's wake
path costs on top of the engine's own wake and an ordinary request. The
fake's `--log-requests` stamps (time.time() on arrival of each request at the
engine) split the total into: arrival at the gateway -> /wake_up at the
engine, /wake_up -> the chat request at the engine (the wake itself, the
gateway's /is_sleeping check and its forwarding), and the chat request at the
engine -> first byte at the client.

Figures never fail the run: exit 0 unless the benchmark itself broke.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
SHIM = Path(PY).parent / "vllm-gateway"
FAKE = REPO / "scripts" / "fake-vllm"
UNIT = "bench-wake.service"
TARGET_MS = 50.0

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ADMIN_KEY, Procs, call, free_port, wait_port  # noqa: E402


def log(msg: str) -> None:
    print(f"bench-wake: {msg}", file=sys.stderr, flush=True)




CHAT = json.dumps(
    {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
).encode()


def first_byte(port: int, method: str, path: str, body: bytes = b"") -> tuple[float, float, float, bytes]:
    """One request on a fresh connection: (wall clock at start, seconds to the
    first response byte, wall clock at the first byte, whole response)."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        + ("Content-Type: application/json\r\n" if body else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    wall0 = time.time()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(head + body)
        first = s.recv(1)
        t1 = time.perf_counter()
        wall1 = time.time()
        if not first:
            raise RuntimeError(f"{method} {path} on port {port}: closed without an answer")
        chunks = [first]
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    resp = b"".join(chunks)
    if not resp.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{method} {path} on port {port} answered {resp[:300]!r}")
    return wall0, t1 - t0, wall1, resp


def state(port: int) -> str:
    _code, body = call(port, "GET", "/gateway/status")
    return str(json.loads(body).get("state"))


def put_to_sleep(port: int, timeout_s: float = 30.0) -> None:
    code, body = call(port, "POST", "/gateway/sleep")
    if code != 200:
        raise RuntimeError(f"POST /gateway/sleep answered {code}: {body[:300]!r}")
    deadline = time.monotonic() + timeout_s
    while (s := state(port)) != "sleeping":
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the gateway says {s!r}, not 'sleeping', {timeout_s:g} s after POST /gateway/sleep"
            )
        time.sleep(0.01)


def read_log(path: Path, start: int) -> tuple[list[dict[str, Any]], int]:
    with path.open("rb") as f:
        f.seek(start)
        data = f.read()
    entries = [json.loads(line) for line in data.splitlines() if line.strip()]
    return entries, start + len(data)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--wake-delay-s", type=float, default=0.5)
    ap.add_argument("--sleep-delay-s", type=float, default=0.05)
    ap.add_argument("--command", default="scripts/bench-wake")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="bench-wake-"))
    procs = Procs(work)
    gw_port, eng_port, direct_port = free_port(), free_port(), free_port()
    gw_log, direct_log = work / "engine-requests.jsonl", work / "direct-requests.jsonl"
    fake_flags = [
        "--enable-sleep-mode",
        "--served-model-name",
        "bench",
        "--wake-delay-s",
        f"{a.wake_delay_s:g}",
        "--sleep-delay-s",
        f"{a.sleep_delay_s:g}",
    ]
    engine_cmd = [PY, str(FAKE), *fake_flags, "--log-requests", str(gw_log)]
    cfg = work / "wake.toml"
    cfg.write_text(
        f'[gateway]\nlisten = "127.0.0.1:{gw_port}"\nexit_after = "off"\nadmin_key = "{ADMIN_KEY}"\n'
        f"[engines.main]\ncommand = {json.dumps(engine_cmd)}\nport = {eng_port}\n"
        f'models = ["bench"]\nunit = "{UNIT}"\nstop_after = "off"\nsleep_after = "10m"\n'
        f'sleep_level = 1\nstart_timeout = "60s"\n'
    )
    rows: list[dict[str, float]] = []
    broke = ""
    shim = None
    try:
        shim = procs.start("shim", [str(SHIM), "--config", str(cfg), "serve"])
        wait_port(gw_port)
        # The direct engine: the same fake, run without the gateway, for the engine's own wake time.
        procs.start(
            "direct",
            [PY, str(FAKE), *fake_flags, "--port", str(direct_port), "--log-requests", str(direct_log)],
            env={"VLLM_SERVER_DEV_MODE": "1"},
        )
        wait_port(direct_port)

        log("cold start and warm-up")
        first_byte(gw_port, "POST", "/v1/chat/completions", CHAT)  # starts the engine
        for _ in range(3):
            first_byte(gw_port, "POST", "/v1/chat/completions", CHAT)
        put_to_sleep(gw_port)  # one untimed cycle
        first_byte(gw_port, "POST", "/v1/chat/completions", CHAT)
        first_byte(direct_port, "POST", "/sleep?level=1")
        first_byte(direct_port, "POST", "/wake_up")
        _, offset = read_log(gw_log, 0)

        log(f"{a.rounds} rounds")
        for i in range(a.rounds):
            put_to_sleep(gw_port)
            time.sleep(0.05)  # let the sleep settle: nothing else in flight
            w0, total, w1, resp = first_byte(gw_port, "POST", "/v1/chat/completions", CHAT)
            if b"chat.completion" not in resp:
                raise RuntimeError(f"round {i}: the woken request answered {resp[:300]!r}")
            entries, offset = read_log(gw_log, offset)
            wake_t = next((e["t"] for e in entries if e["path"] == "/wake_up"), None)
            chat_t = next((e["t"] for e in entries if e["path"] == "/v1/chat/completions"), None)
            if wake_t is None or chat_t is None:
                raise RuntimeError(f"round {i}: no /wake_up and chat request in the engine's log: {entries}")
            if any(e["path"] == "/v1/chat/completions" and e["sleeping"] for e in entries):
                raise RuntimeError(f"round {i}: a chat request reached the engine while it slept")
            _, awake, _, _ = first_byte(gw_port, "POST", "/v1/chat/completions", CHAT)
            entries, offset = read_log(gw_log, offset)
            first_byte(direct_port, "POST", "/sleep?level=1")
            _, wake, _, _ = first_byte(direct_port, "POST", "/wake_up")
            rows.append(
                {
                    "total": total * 1000,
                    "wake": wake * 1000,
                    "awake": awake * 1000,
                    "added": (total - wake - awake) * 1000,
                    "to_wake": (wake_t - w0) * 1000,
                    "wake_to_chat": (chat_t - wake_t) * 1000,
                    "chat_to_fb": (w1 - chat_t) * 1000,
                }
            )
    except Exception as e:
        broke = f"{type(e).__name__}: {e}"
        log(f"run stopped early: {broke}")
        for f in sorted(work.glob("*.log")):
            with contextlib.suppress(OSError):
                tail = f.read_text(errors="replace").splitlines()[-15:]
                log(f"--- {f.name}\n" + "\n".join(tail))
    finally:
        if shim is not None and shim.poll() is None:
            with contextlib.suppress(Exception):
                call(gw_port, "POST", "/gateway/stop")
        procs.stop_all()
        subprocess.run(["systemctl", "--user", "stop", UNIT], capture_output=True, check=False)

    if rows:
        labels = [
            ("total", "total: arrival -> first byte (woken)"),
            ("wake", "engine wake: POST /wake_up, direct"),
            ("awake", "awake baseline: same request, no wake"),
            ("added", "added = total - wake - awake"),
            ("to_wake", "  arrival -> /wake_up at engine"),
            ("wake_to_chat", "  /wake_up -> chat request at engine"),
            ("chat_to_fb", "  chat request at engine -> first byte"),
        ]
        fake = f"fake-vllm --wake-delay-s {a.wake_delay_s:g}"
        print(f"{a.command}: wake path over {len(rows)} rounds ({fake}), {os.cpu_count()} CPUs; ms")
        print(f"{'':42} {'p50':>8} {'p95':>8} {'max':>8}")
        for key, label in labels:
            xs = [r[key] for r in rows]
            print(f"{label:42} {pct(xs, 0.5):8.1f} {pct(xs, 0.95):8.1f} {max(xs):8.1f}")
        added = [r["added"] for r in rows]
        verdict = "PASS" if pct(added, 0.95) < TARGET_MS else "MISS"
        print(
            f"{verdict}: added latency p50 {pct(added, 0.5):.1f} ms, p95 {pct(added, 0.95):.1f} ms, "
            f"max {max(added):.1f} ms (target: under {TARGET_MS:g} ms at p95)"
        )
    if broke:
        print(f"broken: {broke}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
