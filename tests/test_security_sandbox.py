"""API keys, admin access, limits and the max_tokens guardrail, end to end.
An unauthenticated or malformed request must never start the engine."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gatewaying import Gateway
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

API_KEY = "sk-local-0123456789"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    g = Gateway(sandbox)
    g.configure(["--startup-delay", "1"], gateway={"api_keys": [API_KEY], "max_connections": 8})
    yield g


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def raw(gw: Gateway, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_requests_without_a_valid_key_are_refused_before_anything_else(gw: Gateway) -> None:
    for headers in ({}, auth("sk-wrong-000000000"), {"Authorization": API_KEY}):
        code, hdrs, body = gw.request("POST", "/v1/chat/completions", CHAT, headers=headers)
        assert code == 401, body
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
        assert hdrs["www-authenticate"].startswith("Bearer")
    assert gw.request("GET", "/v1/models")[0] == 401
    assert gw.request("GET", "/metrics")[0] == 401
    assert gw.request("GET", "/health")[0] == 200  # liveness needs no key
    assert gw.active("vllm.service") == "inactive"  # nothing started the engine
    code, _, _ = gw.request("POST", "/v1/chat/completions", CHAT, headers=auth())
    assert code == 200
    assert API_KEY not in gw.journal("vllm-gateway")
    assert "sk-wrong" not in gw.journal("vllm-gateway")


def test_admin_endpoints_need_the_admin_key_or_the_control_socket(gw: Gateway) -> None:
    for headers in ({}, auth()):  # an API key is not an admin key
        code, _, body = gw.request("POST", "/gateway/stop", headers=headers)
        assert code == 401, body
    assert gw.active("vllm.service") == "active"
    cli = str(Path(sys.executable).parent / "vllm-gateway")
    out = gw.sb.run([cli, "stop"]).stdout  # the control socket
    assert "stopped" in out
    assert gw.active("vllm.service") == "inactive"


def test_without_an_admin_key_admin_endpoints_answer_only_locally(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1"], gateway={"admin_key": None})
    code, _, body = gw.request("POST", "/gateway/start", headers={})
    assert code == 403 and b"control socket" in body
    assert gw.active("vllm.service") == "inactive"


def test_limits_answer_with_the_right_status_and_start_nothing(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1"])
    assert gw.request("GET", "/v1/models?" + "x" * 9000)[0] == 414
    assert raw(gw, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n") \
        .startswith(b"HTTP/1.1 431 ")
    big = b'{"model": "tiny", "pad": "' + b"x" * (33 * 2**20) + b'"}'
    assert gw.request("POST", "/v1/chat/completions", big)[0] == 413
    # request smuggling: conflicting framing is refused, nothing is forwarded
    smuggle = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/models HTTP/1.1\r\n\r\n")
    assert raw(gw, smuggle).startswith(b"HTTP/1.1 400 ")
    assert gw.active("vllm.service") == "inactive"


def test_connections_past_the_cap_get_503(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1"], gateway={"max_connections": 4})
    assert gw.request("GET", "/health")[0] == 200  # the shim is up
    held = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(4)]
    try:
        reply = raw(gw, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503 "), reply[:100]
        assert b"too many open connections" in reply
    finally:
        for s in held:
            s.close()


def test_max_tokens_guardrail_rejects_or_caps(gw: Gateway, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    gw.configure(["--startup-delay", "1", "--log-requests", str(log)], max_tokens=64)
    code, _, body = gw.request("POST", "/v1/chat/completions", {**CHAT, "max_tokens": 100_000})
    assert code == 400 and b"over this gateway's limit of 64" in body
    code, _, body = gw.request("POST", "/v1/responses", {"model": "tiny", "input": "x",
                                                         "max_output_tokens": 100_000})
    assert code == 400 and b"max_output_tokens=100000 is over this gateway's limit of 64" in body
    assert gw.active("vllm.service") == "inactive"
    assert gw.chat()[0] == 200  # no limit asked: the gateway's applies
    gw.configure(["--startup-delay", "1", "--log-requests", str(log)], max_tokens=64,
                 max_tokens_policy="cap")
    assert gw.request("POST", "/v1/completions", {"model": "tiny", "prompt": "x",
                                                  "max_tokens": 5000})[0] == 200
    # the stand-in engine serves no /v1/responses (404), but records what it was sent
    gw.request("POST", "/v1/responses", {"model": "tiny", "input": "x", "max_output_tokens": 5000})
    gw.request("POST", "/v1/responses", {"model": "tiny", "input": "x"})
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    bodies = [r["body"] for r in seen if r["path"] in ("/v1/chat/completions", "/v1/completions")]
    assert [b["max_tokens"] for b in bodies] == [64, 64]
    responses = [r["body"] for r in seen if r["path"] == "/v1/responses"]
    assert [b["max_output_tokens"] for b in responses] == [64, 64]


def test_requests_missing_what_the_engine_needs_are_refused_before_a_cold_start(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1"])
    for path, body in [("/v1/chat/completions", {}), ("/v1/chat/completions", {"messages": "hi"}),
                       ("/v1/completions", {"model": "tiny"}), ("/v1/embeddings", {"model": "tiny"})]:
        code, _, answer = gw.request("POST", path, body)
        assert code == 400 and b"needs a" in answer, (path, answer)
    assert gw.active("vllm.service") == "inactive"
