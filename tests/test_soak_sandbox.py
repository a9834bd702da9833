"""Soak: a few hundred concurrent clients for a bounded time, mixing whole and
streamed chats, clients that leave mid-stream and requests that must be
refused. Every request is counted; none may be lost.

Short by default (about 45 s, for CI); `VLLM_GATEWAY_SOAK_S=600` runs ten
minutes, `VLLM_GATEWAY_SOAK_CLIENTS` changes the number of clients."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from tests.gatewaying import Gateway, wait_until
from tests.reliability_report import record
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

SOAK_S = float(os.environ.get("VLLM_GATEWAY_SOAK_S", "45"))
CLIENTS = int(os.environ.get("VLLM_GATEWAY_SOAK_CLIENTS", "200"))
REQUEST_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    g = Gateway(sandbox)
    g.configure(["--startup-delay", "1", "--token-interval-ms", "2"], stop_after="off", stop_timeout="2s")
    yield g


def http_request(method: str, path: str, body: bytes | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def chat(stream: bool, reply: str, model: str = "tiny") -> bytes:
    return json.dumps({"model": model, "stream": stream, "fake_reply": reply,
                       "messages": [{"role": "user", "content": "soak"}]}).encode()


class Lost(Exception):
    """A request that did not get what it should have."""


async def exchange(port: int, data: bytes, leave_after: bytes | None = None) -> bytes:
    """Send one request and read the answer to its end (or until `leave_after`
    shows up, then leave without reading further)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        got = b""
        while chunk := await reader.read(65536):
            got += chunk
            if leave_after is not None and leave_after in got:
                break
        return got
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    if not answer.startswith(b"HTTP/1.1 "):
        raise Lost(f"no status line: {answer[:80]!r}")
    return int(answer[9:12])


# Each kind: (weight, what it sends, expected status, check of the answer, outcome when as expected)
CHAT_PATH = "/v1/chat/completions"
Kind = tuple[int, Callable[[random.Random], bytes], int, Callable[[bytes], bool], str, bytes | None]
KINDS: dict[str, Kind] = {
    "whole": (30, lambda r: http_request("POST", CHAT_PATH, chat(False, "w " * r.randint(1, 20))),
              200, lambda a: b'"choices"' in a, "answered", None),
    "stream": (30, lambda r: http_request("POST", CHAT_PATH, chat(True, "s " * r.randint(1, 30))),
               200, lambda a: b"data: [DONE]" in a, "answered", None),
    "leave_mid_stream": (15, lambda r: http_request("POST", CHAT_PATH, chat(True, "l " * 300)),
                         200, lambda a: b"data:" in a, "left", b"data:"),
    "invalid_json": (8, lambda r: http_request("POST", CHAT_PATH, b'{"model": "tiny", '),
                     400, lambda a: True, "rejected", None),
    "unknown_model": (8, lambda r: http_request("POST", CHAT_PATH, chat(False, "x", "no-such")),
                      404, lambda a: True, "rejected", None),
    "unknown_path": (9, lambda r: http_request("GET", f"/v1/no-such-{r.randint(0, 999)}"),
                     404, lambda a: True, "rejected", None),
}


async def soak(port: int, clients: int, seconds: float) -> tuple[Counter[str], list[str]]:
    counts: Counter[str] = Counter()
    lost: list[str] = []
    deadline = time.monotonic() + seconds
    names = list(KINDS)
    weights = [KINDS[n][0] for n in names]

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        await asyncio.sleep(rng.uniform(0, 1))  # do not all connect in the same millisecond
        while time.monotonic() < deadline:
            name = rng.choices(names, weights)[0]
            _, make, expected, check, outcome, leave_after = KINDS[name]
            counts["requests"] += 1
            try:
                answer = await asyncio.wait_for(exchange(port, make(rng), leave_after), REQUEST_TIMEOUT_S)
                code = status_of(answer)
                if code != expected or not check(answer):
                    raise Lost(f"{code}: {answer[-200:]!r}")
                counts[outcome] += 1
            except (OSError, Lost, TimeoutError) as e:
                counts["lost"] += 1
                lost.append(f"{name}: {type(e).__name__}: {e}")
            await asyncio.sleep(rng.uniform(0, 0.05))

    await asyncio.gather(*(client(i) for i in range(clients)))
    return counts, lost


def test_soak_loses_no_request(gw: Gateway, request: pytest.FixtureRequest) -> None:
    assert gw.chat()[0] == 200  # warm: the soak measures the running gateway
    started = time.monotonic()
    counts, lost = asyncio.run(soak(gw.port, CLIENTS, SOAK_S))
    minutes = (time.monotonic() - started) / 60
    wait_until(lambda: gw.status()["in_flight"] == 0, 30, "in_flight to come back to 0")
    record(request, "soak", clients=CLIENTS, requests=counts["requests"],
           minutes=round(minutes, 2), answered=counts["answered"], rejected=counts["rejected"],
           left_mid_stream=counts["left"], lost=counts["lost"])
    assert counts["lost"] == 0, lost[:20]
    assert counts["requests"] == counts["answered"] + counts["rejected"] + counts["left"]
    assert counts["requests"] >= CLIENTS
    assert gw.active("vllm-gateway.service") == "active"
    assert "Traceback" not in gw.journal("vllm-gateway")
