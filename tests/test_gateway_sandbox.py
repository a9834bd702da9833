"""The core gateway end to end: installed units in a real systemd user
manager, the fake engine behind them, clients on the socket's port."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.gatewaying import Gateway, wait_until
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    g = Gateway(sandbox)
    g.configure(["--startup-delay", "2", "--token-interval-ms", "20", "--workers", "2"])
    yield g


def test_first_request_activates_the_shim_and_cold_starts_the_engine(gw: Gateway) -> None:
    assert gw.active("vllm-gateway.service") == "inactive"
    assert gw.active("vllm.service") == "inactive"
    code, headers, body = gw.chat()
    assert code == 200, body
    reply = json.loads(body)
    assert reply["choices"][0]["message"]["content"]
    assert int(headers["x-vllm-gateway-cold-start-ms"]) >= 1500  # the fake's 2 s start
    assert gw.active("vllm-gateway.service") == "active"
    assert gw.active("vllm.service") == "active"
    st = gw.status()
    assert st["state"] == "ready"
    assert st["last_cold_start_s"] >= 1.5
    # systemd shows the shim's status line
    assert "state=ready" in gw.unit_prop("vllm-gateway.service", "StatusText")


def test_own_endpoints_never_start_the_engine(gw: Gateway) -> None:
    gw.request("POST", "/gateway/stop")
    assert gw.active("vllm.service") == "inactive"
    since = gw.status()["state_since"]
    for method, path, expect in [
        ("GET", "/health", 200), ("GET", "/v1/models", 200), ("GET", "/gateway/status", 200),
        ("GET", "/favicon.ico", 404), ("POST", "/sleep?level=1", 404), ("GET", "/v1/chat/completions", 405),
    ]:
        code, _, body = gw.request(method, path)
        assert code == expect, (path, body)
    code, _, body = gw.request("POST", "/v1/chat/completions", b"{not json")
    assert code == 400 and b"not valid JSON" in body
    code, _, body = gw.request("POST", "/v1/chat/completions", {"model": "other", "messages": []})
    assert code == 404 and b"tiny" in body
    models = json.loads(gw.request("GET", "/v1/models")[2])
    assert [m["id"] for m in models["data"]] == ["tiny"]
    # the engine's owner handles messages in order: once it has handled this
    # stop, it has handled anything those requests could have asked of it
    gw.request("POST", "/gateway/stop")
    st = gw.status()
    assert (st["state"], st["state_since"]) == ("stopped", since)  # no transition at all
    assert gw.active("vllm.service") == "inactive"


def test_concurrent_requests_during_a_cold_start_share_one_engine(gw: Gateway) -> None:
    gw.request("POST", "/gateway/stop")
    starts_before = gw.journal("vllm").count("Application startup complete")
    results: list[int] = []

    def one() -> None:
        results.append(gw.chat()[0])

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 16
    wait_until(lambda: gw.journal("vllm").count("Application startup complete") > starts_before,
               10, "the engine's start in the journal")
    assert gw.journal("vllm").count("Application startup complete") == starts_before + 1


def test_streaming_passes_through_event_by_event(gw: Gateway) -> None:
    gw.chat()  # warm
    c = gw.connect()
    body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}],
            "fake_reply": "one two three four five six seven eight nine ten eleven twelve"}
    c.request("POST", "/v1/chat/completions", body=json.dumps(body))
    resp = c.getresponse()
    assert resp.status == 200
    assert resp.getheader("content-type", "").startswith("text/event-stream")
    arrivals: list[float] = []
    data = b""
    while chunk := resp.read1(65536):
        arrivals.append(time.monotonic())
        data += chunk
    c.close()
    events = [e for e in data.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    text = "".join(
        (json.loads(e[6:])["choices"][0]["delta"].get("content") or "") for e in events[:-1]
    )
    assert text == body["fake_reply"]
    # the fake paces tokens 20 ms apart: a buffering proxy would deliver in one read
    assert len(arrivals) >= 5
    assert arrivals[-1] - arrivals[0] >= 0.1


def test_start_failure_answers_503_fast_with_the_engines_own_words(gw: Gateway) -> None:
    gw.configure(["--fail-at-startup", "CUDA out of memory: tried to allocate 20 GiB"])
    t0 = time.monotonic()
    code, headers, body = gw.chat()
    took = time.monotonic() - t0
    assert code == 503, body
    err = json.loads(body)["error"]
    assert "failed to start" in err["message"]
    assert "CUDA out of memory" in err["message"]  # quoted from the journal
    assert int(headers["retry-after"]) >= 1
    assert took < 30  # not the 5-minute start timeout
    # the cool-down answers at once, without launching vLLM again
    starts = gw.journal("vllm-gateway").count("starting engine main")
    code2, _, body2 = gw.chat()
    assert code2 == 503 and b"CUDA out of memory" in body2
    assert gw.journal("vllm-gateway").count("starting engine main") == starts
    assert gw.status()["state"] == "failed"


def test_a_start_that_takes_too_long_fails_and_the_unit_is_stopped(gw: Gateway) -> None:
    gw.configure(["--hang-at-startup"], start_timeout="3s")
    code, _, body = gw.chat()
    assert code == 503
    assert b"did not become ready within 3 s" in body
    wait_until(lambda: gw.active("vllm.service") in ("inactive", "failed"), 20, "the hung engine to stop")


def test_killed_shim_is_restarted_and_adopts_the_running_engine(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1"])
    assert gw.chat()[0] == 200
    engine_pid = gw.unit_prop("vllm.service", "MainPID")
    shim_pid = gw.unit_prop("vllm-gateway.service", "MainPID")
    gw.sb.systemctl("kill", "--signal=SIGKILL", "vllm-gateway.service")
    # clients connecting meanwhile wait in the socket's queue; none is refused
    codes = [gw.chat()[0] for _ in range(5)]
    assert codes == [200] * 5
    wait_until(lambda: gw.active("vllm-gateway.service") == "active", 20, "the shim's restart")
    assert gw.unit_prop("vllm-gateway.service", "MainPID") != shim_pid
    assert gw.unit_prop("vllm.service", "MainPID") == engine_pid  # adopted, not doubled
    assert gw.status()["state"] == "ready"
    assert re.search(r"adopting vllm\.service", gw.journal("vllm-gateway"))


def test_streams_waiting_through_a_cold_start_get_keepalive_comments(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "5"], gateway={"stream_keepalive": "1s"})
    c = gw.connect()
    body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}],
            "fake_reply": "after the wait"}
    t0 = time.monotonic()
    c.request("POST", "/v1/chat/completions", body=json.dumps(body))
    resp = c.getresponse()
    assert resp.status == 200
    assert time.monotonic() - t0 < 4.5  # the head came before the engine was ready
    data = resp.read().decode()
    c.close()
    comments = [line for line in data.split("\n") if line.startswith(": vllm-gateway: starting engine")]
    assert len(comments) >= 2, data[:500]
    events = [e for e in data.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "after the wait"


def test_a_start_failure_after_keepalives_ends_the_stream_with_an_error_event(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "3", "--fail-at-startup", "no such model"],
                 gateway={"stream_keepalive": "1s"})
    code, _, body = gw.request("POST", "/v1/chat/completions", {
        "model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert code == 200  # committed to a stream while waiting
    text = body.decode()
    assert ": vllm-gateway: starting engine" in text
    last = [e for e in text.split("\n\n") if e.startswith("data: ")][-1]
    error = json.loads(last[6:])["error"]
    assert "failed to start" in error["message"] and "no such model" in error["message"]


def test_the_openai_client_reads_a_stream_through_keepalives(gw: Gateway) -> None:
    import openai

    gw.configure(["--startup-delay", "3"], gateway={"stream_keepalive": "1s"})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="none", timeout=60)
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_body={"fake_reply": "through the comments"})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "through the comments"


def test_an_engine_error_in_fastapis_shape_reaches_the_client_in_openais(gw: Gateway) -> None:
    # the fake answers as vLLM does for an endpoint the model lacks: 404 {"detail": "Not Found"}
    code, headers, body = gw.request("POST", "/v1/embeddings", {"model": "tiny", "input": "x"})
    assert code == 404, body
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": {"message": "Not Found", "type": "invalid_request_error",
                                          "param": None, "code": None}}
    assert int(headers["content-length"]) == len(body)
    # errors already in OpenAI's shape pass unchanged
    code, _, body = gw.chat(model="tiny", max_tokens=0)
    assert code == 400 and json.loads(body)["error"]["message"] == "max_tokens must be at least 1, got 0."


def raw_exchange(gw: Gateway, request: bytes) -> bytes:
    """One request on a fresh connection, read until the gateway closes it."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=60) as s:
        s.sendall(request)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def test_the_gateways_own_answers_have_reason_phrases_and_their_true_size(gw: Gateway) -> None:
    for target, status in ((b"/gateway/status", b"200 OK"), (b"/favicon.ico", b"404 Not Found"),
                           (b"/v1/chat/completions", b"405 Method Not Allowed")):
        got = raw_exchange(gw, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 " + status + b"\r\n"), got[:100]
        body = got.split(b"\r\n\r\n", 1)[1]
        line = f"GET {target.decode()} {status[:3].decode()} {len(body)}B "
        wait_until(lambda line=line: line in gw.journal("vllm-gateway"), 10, f"the request line {line!r}")


def test_a_streamed_cold_start_tells_the_client_its_wait(gw: Gateway) -> None:
    gw.request("POST", "/gateway/stop")
    assert gw.active("vllm.service") == "inactive"
    body = json.dumps({"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    got = raw_exchange(gw, (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                            f"{body}").encode())
    head, _, rest = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    found = re.search(rb": vllm-gateway: cold start, waited (\d+\.\d) s for the engine\n\n", rest)
    assert found is not None, rest[:300]
    assert float(found.group(1)) >= 1.5  # the fake's 2 s start
    assert rest.index(found.group(0)) < rest.index(b"data: {")
    assert b"data: [DONE]" in rest
