"""The stop policy for requests in flight, against the fake engine in the
sandbox. The fake waits for open connections on SIGTERM as vLLM 0.32 does
(`--wait-for-connections`), so a stop that left a stream open would last
until systemd's stop_timeout (60 s here) kills the unit."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.gatewaying import Gateway, wait_until
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

GRACE_S = 2.0
STOP_TIMEOUT_S = 60.0
# 50 ms a token: 400 tokens take 20 s, far past the grace.
FAKE_ARGS = ["--token-interval-ms", "50", "--wait-for-connections"]
LONG = " ".join(["word"] * 400)
SHORT = " ".join(["word"] * 10)
# Everything here ends within seconds; the bound only catches a hang.
WAIT_S = 40.0


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    g = Gateway(sandbox)
    g.configure(FAKE_ARGS, stop_grace=f"{GRACE_S:g}s", stop_timeout=f"{STOP_TIMEOUT_S:g}s",
                stop_after="off")
    yield g


class Stream:
    """A streamed chat request on a raw socket, read as it comes."""

    def __init__(self, gw: Gateway, reply: str, request_id: str) -> None:
        body = json.dumps({"model": "tiny", "stream": True, "fake_reply": reply,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        self.sock = socket.create_connection(("127.0.0.1", gw.port), timeout=WAIT_S)
        self.sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: {request_id}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                          + body)
        self.got = b""

    def first_event(self) -> None:
        while b"data: {" not in self.got:
            chunk = self.sock.recv(65536)
            assert chunk, self.got
            self.got += chunk

    def rest(self) -> bytes:
        """Everything until the end of the response (the gateway closes after an error)."""
        while not self.got.endswith(b"0\r\n\r\n"):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.got += chunk
        self.sock.close()
        return self.got

    def events(self) -> list[Any]:
        out = []
        for part in self.got.split(b"\n\n"):
            _, sep, data = part.partition(b"data: ")
            if sep and data != b"[DONE]":
                out.append(json.loads(data))
        return out


def stop_in_background(gw: Gateway) -> tuple[threading.Thread, list[int]]:
    answer: list[int] = []

    def stop() -> None:
        answer.append(gw.request("POST", "/gateway/stop", timeout_s=STOP_TIMEOUT_S + 30)[0])

    t = threading.Thread(target=stop)
    t.start()
    return t, answer


def request_line(gw: Gateway, request_id: str) -> str:
    lines = [line for line in gw.journal("vllm-gateway").splitlines() if f"id={request_id}" in line]
    return lines[-1] if lines else ""


def test_a_stop_cuts_a_stream_after_the_grace_and_vllm_exits_at_once(gw: Gateway) -> None:
    assert gw.chat()[0] == 200
    stream = Stream(gw, LONG, "stop-long")
    stream.first_event()
    t0 = time.monotonic()
    thread, answer = stop_in_background(gw)
    body = stream.rest()
    cut_after = time.monotonic() - t0
    thread.join(WAIT_S)
    stopped_after = time.monotonic() - t0
    assert answer == [200], gw.journal("vllm-gateway")[-4000:]
    assert gw.active("vllm.service") == "inactive"
    print(f"\nstream cut {cut_after:.1f} s after the stop; engine gone after {stopped_after:.1f} s")
    # the stream ran on through the grace, then got an error that names the stop
    assert GRACE_S - 0.5 <= cut_after < GRACE_S + 5, cut_after
    assert stopped_after < GRACE_S + 10, stopped_after  # not stop_timeout (60 s)
    events = stream.events()
    assert len(events) > 10, body[-500:]
    assert "error" in events[-1], events[-1]
    assert "stopped by vllm-gateway stop" in events[-1]["error"]["message"]
    assert not body.endswith(b"data: [DONE]\n\n0\r\n\r\n")
    wait_until(lambda: "outcome=stopped" in request_line(gw, "stop-long"), 10, "the request's journal line")
    assert " 200 " in request_line(gw, "stop-long")


def test_a_stream_that_ends_within_the_grace_is_not_cut(gw: Gateway) -> None:
    assert gw.chat()[0] == 200
    stream = Stream(gw, SHORT, "stop-short")
    stream.first_event()
    thread, answer = stop_in_background(gw)
    body = stream.rest()
    thread.join(WAIT_S)
    assert answer == [200], gw.journal("vllm-gateway")[-4000:]
    assert b"data: [DONE]" in body
    assert not any("error" in e for e in stream.events())
    assert gw.active("vllm.service") == "inactive"
    wait_until(lambda: request_line(gw, "stop-short") != "", 10, "the request's journal line")
    assert "outcome=" not in request_line(gw, "stop-short")


def test_a_stop_from_outside_cuts_streams_at_once(gw: Gateway) -> None:
    assert gw.chat()[0] == 200
    stream = Stream(gw, LONG, "stop-outside")
    stream.first_event()
    t0 = time.monotonic()
    gw.sb.systemctl("stop", "vllm.service")
    took = time.monotonic() - t0
    stream.rest()
    print(f"\nsystemctl stop took {took:.1f} s with a stream open")
    assert took < 10, took
    events = stream.events()
    assert "stopped outside the gateway" in events[-1]["error"]["message"], events[-1]


def test_a_client_that_leaves_mid_stream_leaves_its_journal_line(gw: Gateway) -> None:
    assert gw.chat()[0] == 200
    stream = Stream(gw, LONG, "client-left")
    stream.first_event()
    stream.sock.close()
    wait_until(lambda: "outcome=client_gone" in request_line(gw, "client-left"), 20,
               "the journal line of a request whose client left")
    _, _, metrics = gw.request("GET", "/metrics")
    broken = [line for line in metrics.decode().splitlines()
              if line.startswith("vllm_gateway_requests_broken_total") and 'outcome="client_gone"' in line]
    assert broken and float(broken[0].split()[-1]) >= 1, broken


def test_a_yield_cuts_a_stream_after_the_grace_naming_who_took_the_gpu(gw: Gateway) -> None:
    assert gw.chat()[0] == 200
    stream = Stream(gw, LONG, "yield-long")
    stream.first_event()
    t0 = time.monotonic()
    answer: list[int] = []
    thread = threading.Thread(target=lambda: answer.append(
        gw.request("POST", "/gateway/yield?by=whisper.service", timeout_s=STOP_TIMEOUT_S + 30)[0]))
    thread.start()
    try:
        stream.rest()
        cut_after = time.monotonic() - t0
        thread.join(WAIT_S)
        assert answer == [200]
        assert gw.active("vllm.service") == "inactive"
        assert GRACE_S - 0.5 <= cut_after < GRACE_S + 5, cut_after
        message = stream.events()[-1]["error"]["message"]
        assert "yielded the GPU to whisper.service" in message, message
        # new requests are refused while the GPU is held
        code, _, body = gw.chat()
        assert code == 503 and b"whisper.service" in body
    finally:
        gw.request("POST", "/gateway/release?by=whisper.service")
    assert gw.chat()[0] == 200
