"""scripts/fake-vllm behaves like vLLM's OpenAI server, faults included."""

from __future__ import annotations

import http.client
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakevllm_util import FAKE_VLLM, FakeVllm, pid_alive, sse_data, stream_chunks

REPLY = "Hello there, fake world."
DEV = {"VLLM_SERVER_DEV_MODE": "1"}
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}

Start = Callable[..., FakeVllm]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    started: list[FakeVllm] = []

    def _start(*args: str, env: dict[str, str] | None = None, ready: bool = True) -> FakeVllm:
        fake = FakeVllm(list(args), tmp_path, env=env)
        started.append(fake)
        if ready:
            fake.wait_ready()
        return fake

    yield _start
    for fake in started:
        fake.kill()


def chunk_json(events: list[str]) -> list[dict[str, Any]]:
    assert events[-1] == "[DONE]"
    assert "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


def chat_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# -- startup ------------------------------------------------------------------


def test_startup_delay_refuses_connections_then_is_healthy(start: Start) -> None:
    began = time.monotonic()
    fake = start("--startup-delay", "1.5", "--max-model-len", "512", "--dtype", "float32", ready=False)
    fake.wait_logged("Loading weights took")  # the startup delay runs now
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fake.port), timeout=2).close()
    fake.wait_ready()
    assert time.monotonic() - began >= 1.4
    assert "Starting vLLM API server" in fake.stdout
    assert "Application startup complete." in fake.stderr
    status, models = fake.json("GET", "/v1/models")
    assert status == 200
    assert models["data"][0]["max_model_len"] == 512


def test_listen_before_ready_answers_models_but_not_health(start: Start) -> None:
    fake = start("--startup-delay", "2", "--listen-before-ready", ready=False)
    deadline = time.monotonic() + 10
    while True:
        try:
            status, _, _ = fake.request("GET", "/health")
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert status == 503
    assert fake.json("GET", "/v1/models")[0] == 200
    assert fake.json("POST", "/v1/chat/completions", CHAT)[0] == 503
    fake.wait_ready()


def test_fail_at_startup_exits_1_with_the_message(start: Start) -> None:
    fake = start("--startup-delay", "0.2", "--fail-at-startup", "CUDA out of memory (fake)", ready=False)
    assert fake.proc.wait(timeout=15) == 1
    assert "RuntimeError: CUDA out of memory (fake)" in fake.stderr
    assert "Traceback (most recent call last):" in fake.stderr
    fake2 = start("--fail-at-startup", "ValueError: bad max_model_len", ready=False)
    assert fake2.proc.wait(timeout=15) == 1
    assert "ValueError: bad max_model_len" in fake2.stderr


def test_hang_at_startup_never_listens_until_sigterm(start: Start) -> None:
    fake = start("--hang-at-startup", ready=False)
    fake.wait_logged("Compiling a graph")  # where it hangs
    assert fake.proc.poll() is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fake.port), timeout=2).close()
    assert fake.terminate() == 0


# -- generation shapes -----------------------------------------------------------


def test_chat_whole_response_shape(start: Start) -> None:
    fake = start("--reply-text", REPLY)
    status, body = fake.json("POST", "/v1/chat/completions", CHAT)
    assert status == 200
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "fake-model"
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == REPLY
    assert choice["message"]["tool_calls"] == []
    assert choice["message"]["reasoning_content"] is None
    assert choice["logprobs"] is None
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] is None
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] is None


def test_chat_stream_shape(start: Start) -> None:
    fake = start("--reply-text", REPLY)
    req = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, payload = fake.request("POST", "/v1/chat/completions", req)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["transfer-encoding"] == "chunked"
    chunks = chunk_json(sse_data(payload))
    first, *middle, last, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["id"] == first["id"]
    for c in [first, *middle]:
        assert c["choices"][0]["finish_reason"] is None
        assert c["choices"][0]["logprobs"] is None
    assert len(middle) > 3
    assert last["choices"][0]["delta"] == {"content": ""}
    assert last["choices"][0]["finish_reason"] == "stop"
    assert chat_text(chunks) == REPLY
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == len(middle) + 1
    # Without include_usage: no usage chunk at all.
    _, _, payload = fake.request("POST", "/v1/chat/completions", {**CHAT, "stream": True})
    chunks = chunk_json(sse_data(payload))
    assert all(c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)


def test_completions_whole_and_streamed(start: Start) -> None:
    fake = start("--reply-text", REPLY)
    status, body = fake.json("POST", "/v1/completions", {"model": "fake-model", "prompt": "Once"})
    assert status == 200
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == REPLY
    assert body["choices"][0]["finish_reason"] == "stop"
    req = {"model": "fake-model", "prompt": "Once", "stream": True}
    _, _, payload = fake.request("POST", "/v1/completions", req)
    chunks = chunk_json(sse_data(payload))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == REPLY
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_fake_reply_overrides_text_with_toolcall_and_unicode(start: Start) -> None:
    fake = start("--seed", "3")
    reply = '<TOOLCALL>[{"name": "météo", "arguments": {"ville": "Zürich 🌧️"}}]</TOOLCALL> 你好 👋🏽'
    req = {**CHAT, "stream": True, "fake_reply": reply}
    _, _, payload = fake.request("POST", "/v1/chat/completions", req)
    chunks = chunk_json(sse_data(payload))
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert "".join(pieces) == reply
    assert len({len(p) for p in pieces}) > 1  # tokens of varying size
    assert all(1 <= len(p) <= 6 for p in pieces)
    assert "<TOOLCALL>" not in pieces  # the tag arrives split
    # The same seed cuts the same text the same way.
    _, _, again = fake.request("POST", "/v1/chat/completions", req)
    assert [c["choices"][0]["delta"].get("content") for c in chunk_json(sse_data(again))[1:-1]] == pieces
    status, body = fake.json("POST", "/v1/chat/completions", {**CHAT, "fake_reply": reply})
    assert status == 200
    assert body["choices"][0]["message"]["content"] == reply


def test_special_tokens_are_dropped_unless_the_request_keeps_them(start: Start) -> None:
    fake = start("--special-tokens", "<TOOLCALL>,</TOOLCALL>")
    reply = 'Sure. <TOOLCALL>[{"name": "f", "arguments": {}}]</TOOLCALL>'
    for stream in (False, True):
        req = {**CHAT, "stream": stream, "fake_reply": reply}
        for keep, expected in ((None, 'Sure. [{"name": "f", "arguments": {}}]'), (False, reply)):
            _, _, payload = fake.request("POST", "/v1/chat/completions",
                                         req if keep is None else {**req, "skip_special_tokens": keep})
            if stream:
                chunks = chunk_json(sse_data(payload))
                text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            else:
                text = json.loads(payload)["choices"][0]["message"]["content"]
            assert text == expected


def test_max_tokens_finishes_with_length(start: Start) -> None:
    fake = start("--reply-text", REPLY)
    status, body = fake.json("POST", "/v1/chat/completions", {**CHAT, "max_tokens": 3})
    assert status == 200
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert REPLY.startswith(body["choices"][0]["message"]["content"])
    assert body["choices"][0]["message"]["content"] != REPLY
    req = {**CHAT, "max_tokens": 3, "stream": True}
    chunks = chunk_json(sse_data(fake.request("POST", "/v1/chat/completions", req)[2]))
    assert len(chunks) == 4  # role chunk and three tokens, the last one finishing
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"][0]["delta"]["content"]
    req = {"prompt": "x", "max_tokens": 2}
    _, body = fake.json("POST", "/v1/completions", req)
    assert body["choices"][0]["finish_reason"] == "length"


def test_keep_alive_reuses_one_connection(start: Start) -> None:
    fake = start()
    conn = fake.connect()
    fake.request("GET", "/health", conn=conn)
    sock = conn.sock
    for _ in range(3):
        assert fake.request("POST", "/v1/chat/completions", {**CHAT, "stream": True}, conn=conn)[0] == 200
        assert fake.request("GET", "/v1/models", conn=conn)[0] == 200
    assert conn.sock is sock
    conn.close()


# -- errors -----------------------------------------------------------------------


def test_unknown_model_and_invalid_json(start: Start) -> None:
    fake = start("--served-model-name", "alpha", "beta")
    _, models = fake.json("GET", "/v1/models")
    assert [m["id"] for m in models["data"]] == ["alpha", "beta"]
    assert models["data"][0]["root"] == "fake-model"
    status, body = fake.json("POST", "/v1/chat/completions", {**CHAT, "model": "nope"})
    assert status == 404
    assert body == {
        "error": {
            "message": "The model `nope` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    assert fake.json("POST", "/v1/chat/completions", {**CHAT, "model": "beta"})[0] == 200
    status, _, payload = fake.request("POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400
    assert json.loads(payload)["error"]["code"] == 400
    assert fake.json("GET", "/no/such/path")[0] == 404


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_tools_with_auto_choice_need_the_engine_flags(start: Start) -> None:
    fake = start()
    for req in ({**CHAT, "tools": TOOLS}, {**CHAT, "tools": TOOLS, "tool_choice": "auto"}):
        status, body = fake.json("POST", "/v1/chat/completions", req)
        assert status == 400
        assert body["error"]["message"] == (
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
        )
        assert body["error"]["type"] == "BadRequestError"
    assert (
        fake.json("POST", "/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": "none"})[0] == 200
    )
    fake.terminate()
    enabled = start("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    assert enabled.json("POST", "/v1/chat/completions", {**CHAT, "tools": TOOLS})[0] == 200


# -- faults -----------------------------------------------------------------------


def test_crash_after_tokens_kills_the_process_mid_stream(start: Start) -> None:
    fake = start("--crash-after-tokens", "3", "--reply-text", REPLY)
    conn = fake.connect()
    conn.request("POST", "/v1/chat/completions", json.dumps({**CHAT, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200
    received = b""
    with pytest.raises(http.client.IncompleteRead):
        for data in stream_chunks(resp):
            received += data
    assert fake.proc.wait(timeout=10) == 1
    text = received.decode()
    assert "[DONE]" not in text
    events = [json.loads(e) for e in sse_data(received)]
    assert len(events) == 4  # the role chunk and three tokens
    assert REPLY.startswith(chat_text(events))


def test_hang_after_tokens_stalls_that_request_only(start: Start) -> None:
    fake = start("--hang-after-tokens", "2")
    conn = fake.connect(timeout_s=1.0)
    conn.request("POST", "/v1/chat/completions", json.dumps({**CHAT, "stream": True}))
    resp = conn.getresponse()
    received = b""
    with pytest.raises(TimeoutError):
        for data in stream_chunks(resp):
            received += data
    assert len(sse_data(received)) == 3
    conn.close()
    assert fake.request("GET", "/health")[0] == 200
    _, _, metrics = fake.request("GET", "/metrics")
    assert 'vllm:num_requests_running{engine="0",model_name="fake-model"} 1.0' in metrics.decode()


def rss_mb(fake: FakeVllm) -> float:
    status = Path(f"/proc/{fake.proc.pid}/status").read_text()
    rss_kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    return rss_kb / 1024


def test_hold_rss_mb_is_resident(start: Start) -> None:
    fake = start("--hold-rss-mb", "64")
    assert rss_mb(fake) >= 64


# -- sleep mode ----------------------------------------------------------------------


def test_sleep_endpoints_need_dev_mode_and_sleep_mode(start: Start) -> None:
    plain = start("--enable-sleep-mode")
    dev_only = start(env=DEV)
    for fake in (plain, dev_only):
        assert fake.json("POST", "/sleep?level=1")[0] == 404
        assert fake.json("POST", "/wake_up")[0] == 404
        assert fake.json("GET", "/is_sleeping")[0] == 404
        assert fake.json("POST", "/collective_rpc", {"method": "reload_weights"})[0] == 404


def sleep_state(fake: FakeVllm) -> str:
    metrics = fake.request("GET", "/metrics")[2].decode()
    on = [
        line.split('sleep_state="')[1].split('"')[0]
        for line in metrics.splitlines()
        if line.startswith("vllm:engine_sleep_state{") and line.endswith(" 1.0")
    ]
    assert len(on) == 1, metrics
    return on[0]


def test_sleep_level_comes_from_the_query_only(start: Start) -> None:
    fake = start("--enable-sleep-mode", "--sleep-delay-s", "0.05", "--wake-delay-s", "0.05", env=DEV)
    assert fake.json("GET", "/is_sleeping") == (200, {"is_sleeping": False})
    assert sleep_state(fake) == "awake"
    assert fake.json("POST", "/sleep", {"level": 2})[0] == 200
    assert fake.json("GET", "/is_sleeping") == (200, {"is_sleeping": True})
    assert sleep_state(fake) == "weights_offloaded"
    assert fake.json("POST", "/wake_up")[0] == 200
    assert fake.json("GET", "/is_sleeping") == (200, {"is_sleeping": False})
    # Level 1 keeps the weights: no reload needed before generating.
    assert fake.json("POST", "/v1/chat/completions", CHAT)[0] == 200
    assert fake.json("POST", "/sleep?level=2")[0] == 200
    assert sleep_state(fake) == "discard_all"


def test_generation_while_asleep_breaks_the_server(start: Start) -> None:
    fake = start("--enable-sleep-mode", "--sleep-delay-s", "0", env=DEV)
    assert fake.json("POST", "/sleep?level=1")[0] == 200
    status, body = fake.json("POST", "/v1/chat/completions", CHAT)
    assert status == 500
    assert body["error"]["message"].startswith("EngineCore encountered an issue.")
    assert fake.json("POST", "/wake_up")[0] == 500
    assert fake.json("POST", "/v1/completions", {"prompt": "x"})[0] == 500
    assert fake.request("GET", "/health")[0] != 200


def test_level_2_needs_reload_before_generating(start: Start) -> None:
    fake = start("--enable-sleep-mode", "--sleep-delay-s", "0", "--wake-delay-s", "0", env=DEV)
    assert fake.json("POST", "/sleep?level=2")[0] == 200
    assert fake.json("POST", "/wake_up?tags=weights")[0] == 200
    assert fake.json("GET", "/is_sleeping") == (200, {"is_sleeping": True})
    assert fake.json("POST", "/collective_rpc", {"method": "reload_weights"})[0] == 200
    assert fake.json("POST", "/wake_up?tags=kv_cache")[0] == 200
    assert fake.json("POST", "/reset_prefix_cache")[0] == 200
    assert fake.json("GET", "/is_sleeping") == (200, {"is_sleeping": False})
    assert sleep_state(fake) == "awake"
    assert fake.json("POST", "/v1/chat/completions", CHAT)[0] == 200
    # Waking everything without the reload leaves weights that cannot serve.
    assert fake.json("POST", "/sleep?level=2")[0] == 200
    assert fake.json("POST", "/wake_up")[0] == 200
    assert fake.json("POST", "/v1/chat/completions", CHAT)[0] == 500
    assert fake.request("GET", "/health")[0] != 200


HELD = ("--hold-rss-mb", "128", "--enable-sleep-mode", "--sleep-delay-s", "0", "--wake-delay-s", "0")


def test_sleep_frees_the_held_memory_and_waking_holds_it_again(start: Start) -> None:
    # Like vLLM's VRAM: either sleep level frees it, and it is back when /wake_up answers.
    fake = start(*HELD, env=DEV)
    for level in ("1", "2"):
        assert rss_mb(fake) >= 128
        assert fake.json("POST", f"/sleep?level={level}")[0] == 200
        assert rss_mb(fake) < 100
        assert fake.json("POST", "/wake_up")[0] == 200
        assert rss_mb(fake) >= 128


def test_level_2_holds_the_memory_again_when_the_weights_wake(start: Start) -> None:
    fake = start(*HELD, env=DEV)
    assert fake.json("POST", "/sleep?level=2")[0] == 200
    assert rss_mb(fake) < 100
    assert fake.json("POST", "/wake_up?tags=weights")[0] == 200
    assert rss_mb(fake) >= 128
    assert fake.json("POST", "/collective_rpc", {"method": "reload_weights"})[0] == 200
    assert fake.json("POST", "/wake_up?tags=kv_cache")[0] == 200
    assert rss_mb(fake) >= 128
    # Held once, not twice.
    assert rss_mb(fake) < 2 * 128
    assert fake.json("POST", "/v1/chat/completions", CHAT)[0] == 200


def test_a_failed_wake_leaves_the_memory_free(start: Start) -> None:
    fake = start(*HELD, "--fail-wake", env=DEV)
    assert fake.json("POST", "/sleep")[0] == 200
    assert fake.json("POST", "/wake_up")[0] == 500
    assert rss_mb(fake) < 100


def test_fail_wake_answers_500(start: Start) -> None:
    fake = start("--enable-sleep-mode", "--fail-wake", "--sleep-delay-s", "0", env=DEV)
    assert fake.json("POST", "/sleep")[0] == 200
    assert fake.json("POST", "/wake_up")[0] == 500
    assert fake.json("GET", "/is_sleeping") == (200, {"is_sleeping": True})


# -- metrics, log, shutdown ---------------------------------------------------------


def test_metrics_names_and_counters(start: Start) -> None:
    fake = start("--served-model-name", "m1")
    fake.json("POST", "/v1/chat/completions", {**CHAT, "model": "m1"})
    status, headers, payload = fake.request("GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = payload.decode()
    assert 'vllm:num_requests_running{engine="0",model_name="m1"} 0.0' in text
    assert 'vllm:num_requests_waiting{engine="0",model_name="m1"} 0.0' in text
    assert 'vllm:engine_sleep_state{engine="0",model_name="m1",sleep_state="awake"} 1.0' in text
    assert 'vllm:request_success_total{engine="0",finished_reason="stop",model_name="m1"} 1.0' in text
    assert "# TYPE vllm:request_success_total counter" in text


def test_log_requests_records_what_the_engine_saw(start: Start, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    fake = start("--log-requests", str(log), "--enable-sleep-mode", "--sleep-delay-s", "0", env=DEV)
    fake.json("POST", "/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": "none"})
    fake.json("POST", "/sleep", {"level": 2})
    fake.json("GET", "/is_sleeping")
    fake.request("POST", "/v1/chat/completions", raw=b"{broken")
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    chat = [e for e in entries if e["path"] == "/v1/chat/completions"]
    assert chat[0]["method"] == "POST"
    assert chat[0]["sleeping"] is False
    assert chat[0]["body"]["tool_choice"] == "none"
    assert isinstance(chat[0]["t"], float)
    assert chat[1]["body"] is None
    assert chat[1]["sleeping"] is True
    (sleep,) = [e for e in entries if e["path"] == "/sleep"]
    assert sleep["body"] == {"level": 2}
    assert sleep["sleeping"] is False


def test_sigterm_stops_cleanly_and_kills_workers(start: Start) -> None:
    fake = start("--workers", "2")
    workers = fake.worker_pids()
    assert len(workers) == 2
    assert all(pid_alive(p) for p in workers)
    # An open stream does not hold up the shutdown.
    conn = fake.connect()
    conn.request("POST", "/v1/chat/completions", json.dumps({**CHAT, "stream": True}))
    began = time.monotonic()
    assert fake.terminate() == 0
    assert time.monotonic() - began < 8
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in workers)
    conn.close()


def test_sigint_stops_cleanly(start: Start) -> None:
    fake = start()
    fake.proc.send_signal(signal.SIGINT)
    assert fake.proc.wait(timeout=10) == 0


def ignored_signals(pid: int) -> int:
    """The process's mask of ignored signals (bit N-1 for signal N)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigIgn in /proc/{pid}/status")


def test_a_worker_whose_server_died_before_it_looked_exits() -> None:
    # A server killed right after spawning its workers (a test's cleanup)
    # is gone before a worker first reads its parent: the worker must not
    # take init for the server and wait on it forever.
    code = runpy.run_path(str(FAKE_VLLM), run_name="fake_vllm")["WORKER_CODE"]
    gone = subprocess.Popen(["true"])
    gone.wait()
    worker = subprocess.Popen([sys.executable, "-c", code, "VLLM::EngineCore_DP0", "0", str(gone.pid)])
    try:
        assert worker.wait(timeout=30) == 0
    finally:
        worker.kill()


def test_orphan_workers_outlive_the_server(start: Start) -> None:
    fake = start("--workers", "1", "--orphan-workers")
    (worker,) = fake.worker_pids()
    try:
        # it ignores SIGTERM, as a stuck engine would, once it has set that up
        term = 1 << (signal.SIGTERM - 1)
        deadline = time.monotonic() + 10
        while not ignored_signals(worker) & term:
            assert time.monotonic() < deadline, "the worker never ignored SIGTERM"
            time.sleep(0.02)
        assert fake.terminate() == 0
        assert pid_alive(worker)
        # the kernel drops an ignored signal when it is sent: still there right after
        os.kill(worker, signal.SIGTERM)
        assert pid_alive(worker)
    finally:
        os.kill(worker, signal.SIGKILL)


def test_sleep_during_a_stream_kills_the_engine(start: Start) -> None:
    fake = start(
        "--enable-sleep-mode",
        "--sleep-delay-s",
        "0",
        "--token-interval-ms",
        "200",
        "--reply-text",
        REPLY,
        env=DEV,
    )
    conn = fake.connect()
    conn.request("POST", "/v1/chat/completions", json.dumps({**CHAT, "stream": True}))
    resp = conn.getresponse()
    first = next(stream_chunks(resp))  # the stream is flushed event by event
    assert b'"role":"assistant"' in first
    assert fake.json("POST", "/sleep?level=1")[0] == 200
    events = sse_data(first + resp.read())
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == 500
    assert fake.request("GET", "/health")[0] != 200
    conn.close()


def test_sigterm_with_open_connections_is_quiet(start: Start) -> None:
    # vLLM's stop by systemd: a pooled keep-alive connection and a stream in
    # progress must not leave asyncio tracebacks in the engine's journal
    fake = start("--token-interval-ms", "50")
    idle = fake.connect()
    assert fake.request("POST", "/v1/chat/completions", CHAT, conn=idle)[0] == 200
    streaming = fake.connect()
    streaming.request("POST", "/v1/chat/completions", body=json.dumps({**CHAT, "stream": True}),
                      headers={"content-type": "application/json"})
    resp = streaming.getresponse()
    assert resp.read1(10)
    assert fake.terminate() == 0
    assert "Traceback" not in fake.stderr, fake.stderr
    assert "Finished server process" in fake.stderr
    idle.close()
    streaming.close()
