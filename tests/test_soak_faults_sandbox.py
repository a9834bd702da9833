"""The soak with faults injected while it runs: the engine crashes, systemd
reloads its units, the engine is stopped by hand, and the shim is killed
(SIGKILL), in turn, again and again. Nothing is lost: every request is
answered, refused or ended with an error that names the gateway's cause,
or left by its client; the only others allowed are the connections that
the shim's SIGKILL itself cut (they were open in the killed process).

Short by default (about 40 s of load, for CI); `VLLM_GATEWAY_SOAK_FAULTS_S=300
VLLM_GATEWAY_SOAK_CLIENTS=300` is the long run of docs/reliability.md."""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.gatewaying import Gateway, wait_until
from tests.reliability_report import record
from tests.sandboxing import Sandbox
from tests.test_soak_sandbox import KINDS, REQUEST_TIMEOUT_S, Lost, exchange, status_of

pytestmark = pytest.mark.sandbox

SOAK_S = float(os.environ.get("VLLM_GATEWAY_SOAK_FAULTS_S", "40"))
CLIENTS = int(os.environ.get("VLLM_GATEWAY_SOAK_CLIENTS", "150"))
# One fault every this many seconds, in turn; the engine starts in ~1 s.
FAULT_EVERY_S = 6.0
FAULTS = ("engine crash", "daemon-reload", "manual stop", "shim SIGKILL")
# What the gateway says when it ends or refuses a request for a cause of its own.
NAMED = b"vllm-gateway:"


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    g = Gateway(sandbox)
    g.configure(["--startup-delay", "1", "--token-interval-ms", "2"], stop_after="off", stop_timeout="2s")
    yield g


@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    # (from, to) of each shim SIGKILL: connections open then were in the killed process
    kills: list[list[float]] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    log: list[str] = field(default_factory=list)  # each fault, with its seconds into the soak

    def cut_by_kill(self, started: float, ended: float) -> bool:
        return any(started <= to and ended >= frm for frm, to in self.kills)


def classify(name: str, answer: bytes) -> str:
    """The outcome of one answered request; raises Lost when it is none."""
    _, _, expected, check, outcome, _ = KINDS[name]
    code = status_of(answer)
    if code == 200 and b'data: {"error"' in answer:  # a stream the gateway ended, with its cause
        if NAMED not in answer:
            raise Wrong(f"a stream error without a cause: {answer[-300:]!r}", answer)
        return "ended_with_cause"
    if code == expected and check(answer):
        return outcome
    if code in (502, 503, 504) and NAMED in answer:
        return "refused_with_cause"
    raise Wrong(f"{code}: {answer[-300:]!r}", answer)


async def soak(gw: Gateway, tally: Tally) -> None:
    t0 = time.monotonic()
    deadline = t0 + SOAK_S
    names = list(KINDS)
    weights = [KINDS[n][0] for n in names]

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        await asyncio.sleep(rng.uniform(0, 1))
        while time.monotonic() < deadline:
            name = rng.choices(names, weights)[0]
            _, make, _, _, _, leave_after = KINDS[name]
            tally.counts["requests"] += 1
            started = time.monotonic()
            try:
                answer = await asyncio.wait_for(exchange(gw.port, make(rng), leave_after), REQUEST_TIMEOUT_S)
                tally.counts[classify(name, answer)] += 1
            except (OSError, Lost) as e:
                if tally.cut_by_kill(started, time.monotonic()) and not _complete(e):
                    tally.counts["cut_by_shim_kill"] += 1
                else:
                    tally.counts["lost"] += 1
                    at = time.monotonic() - t0
                    tally.lost.append(f"{name} {started - t0:.2f}-{at:.2f} s: {type(e).__name__}: {e}")
            except TimeoutError:
                tally.counts["lost"] += 1
                tally.lost.append(f"{name}: no answer within {REQUEST_TIMEOUT_S:g} s")
            await asyncio.sleep(rng.uniform(0, 0.05))

    async def faults() -> None:
        i = 0
        while time.monotonic() + FAULT_EVERY_S < deadline:
            await asyncio.sleep(FAULT_EVERY_S)
            fault = FAULTS[i % len(FAULTS)]
            i += 1
            a = time.monotonic() - t0
            await asyncio.to_thread(inject, gw, fault, tally)
            tally.log.append(f"{fault} {a:.2f}-{time.monotonic() - t0:.2f}")

    await asyncio.gather(faults(), *(client(i) for i in range(CLIENTS)))


def _complete(e: Exception) -> bool:
    """Whether the failed exchange got a whole answer (then the shim's SIGKILL
    did not cut it: it is wrong, not cut)."""
    answer = e.answer if isinstance(e, Wrong) else b""
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head:
        return False
    if b"transfer-encoding: chunked" in head.lower():
        return body.endswith(b"0\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.partition(b":")[2])
    return True


class Wrong(Lost):
    """An answer that is not one of the expected outcomes."""

    def __init__(self, message: str, answer: bytes) -> None:
        super().__init__(message)
        self.answer = answer


def inject(gw: Gateway, fault: str, tally: Tally) -> None:
    if fault == "engine crash":
        pid = gw.unit_prop("vllm.service", "MainPID")
        if pid in ("", "0"):
            return  # stopped by the previous fault and not wanted yet
        gw.sb.run(["kill", "-KILL", pid], check=False)
    elif fault == "daemon-reload":
        gw.sb.systemctl("daemon-reload")
    elif fault == "manual stop":
        gw.sb.systemctl("stop", "vllm.service")
    else:
        # open from before the kill: the clients see the resets while systemctl still runs
        window = [time.monotonic(), math.inf]
        tally.kills.append(window)
        gw.sb.systemctl("kill", "--signal=SIGKILL", "vllm-gateway.service", check=False)
        # a connection made after this waits in systemd's socket for the new shim: it is served
        window[1] = time.monotonic()
    tally.faults[fault] += 1


def test_soak_with_faults_loses_no_request(gw: Gateway, request: pytest.FixtureRequest) -> None:
    assert gw.chat()[0] == 200
    tally = Tally()
    started = time.monotonic()
    asyncio.run(soak(gw, tally))
    minutes = (time.monotonic() - started) / 60
    wait_until(lambda: gw.status()["in_flight"] == 0, 60, "in_flight to come back to 0")
    c = tally.counts
    record(request, "soak with faults", clients=CLIENTS, requests=c["requests"], minutes=round(minutes, 2),
           faults=dict(tally.faults), answered=c["answered"], rejected=c["rejected"],
           left_mid_stream=c["left"], refused_with_cause=c["refused_with_cause"],
           ended_with_cause=c["ended_with_cause"], cut_by_shim_kill=c["cut_by_shim_kill"], lost=c["lost"])
    assert c["lost"] == 0, ([line[:400] for line in tally.lost[:20]], tally.log)
    accounted = ("answered", "rejected", "left", "refused_with_cause", "ended_with_cause", "cut_by_shim_kill")
    assert c["requests"] == sum(c[k] for k in accounted)
    assert set(tally.faults) == set(FAULTS), tally.faults
    assert c["answered"] > c["requests"] // 2
    # afterwards the shim and systemd agree on the engine, and it still serves
    assert gw.chat()[0] == 200
    assert gw.status()["state"] == "ready" and gw.active("vllm.service") == "active"
    assert "Traceback" not in gw.journal("vllm-gateway")
