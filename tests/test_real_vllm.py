"""The gateway in front of real vLLM (the CPU build and a tiny local model
made by `scripts/real-vllm-env`), installed in the sandbox's systemd user
manager: what the fake engine cannot prove. The cold start is the real one,
the engine's flags must fit the gateway's tool-call rewriting, a client that
goes away must make vLLM abort, and stopping must leave none of vLLM's
processes behind.

One engine serves most tests; the tests that change the configuration come
last. The model's own output is noise, so the tests force exact text with
vLLM's `structured_outputs` regex.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from shim.journal import PHASE_NAMES
from tests.gatewaying import CONFIG, WEATHER_TOOL, Gateway, toml_value, wait_until
from tests.real_vllm_env import REQUIRED, real_vllm_paths
from tests.sandboxing import Sandbox

pytestmark = [pytest.mark.real_vllm, pytest.mark.sandbox]

# ~31 s on 2 idle cores with --enforce-eager; the first start ever compiles (~69 s).
COLD_START_TIMEOUT_S = 300.0
# Requests after the start: ms per token, but the machine may be loaded.
REQUEST_TIMEOUT_S = 60.0

# typed loosely: the client's TypedDicts add nothing to a literal schema
TOOLS: Any = [WEATHER_TOOL]
TOOL_CALL_TEXT = '<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Tokyo"}}]</TOOLCALL>'
PLAIN_TEXT = "Hello from vLLM."


def exact(text: str) -> str:
    """A regex matching `text` only, in the syntax vLLM's structured outputs take."""
    return "".join("\\" + ch if ch in "\\^$.|?*+()[]{}" else ch for ch in text)


def forced(text: str) -> dict[str, Any]:
    """Request fields that make the engine write exactly `text`."""
    return {"structured_outputs": {"regex": exact(text)}, "temperature": 0}


# the tiny model's max_position_embeddings
MAX_MODEL_LEN = 1024


def engine_command(python: str, model: str, *extra: str) -> list[str]:
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--served-model-name", "tiny", "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32",
            "--gpu-memory-utilization", "0.1", "--enforce-eager", *extra]


# The module engine's configuration; the idle test rewrites it with a short stop_after.
ENGINE_KEYS: dict[str, Any] = {
    "start_timeout": "5m",
    "stop_after": "10m",
    "stop_timeout": "20s",
    # the stop test cuts its stream at once: the tiny model writes 480 tokens in seconds
    "stop_grace": "0s",
    "tool_call_format": "nemotron",
    # A dotted key: the harness renders values as JSON, which TOML takes for
    # strings and lists but not for tables.
    "environment.HF_HUB_OFFLINE": "1",
}


@pytest.fixture(scope="module")
def paths() -> tuple[str, str]:
    found = real_vllm_paths()
    if found is None:
        why = "the real-vLLM environment is not built: run scripts/real-vllm-env"
        if REQUIRED:
            pytest.fail(f"CI must run the real-vLLM tier, but {why}", pytrace=False)
        pytest.skip(why)
    return found


@pytest.fixture(scope="module")
def gw(paths: tuple[str, str], sandbox: Sandbox) -> Iterator[Gateway]:
    g = Gateway(sandbox, timer_every_s=1)
    g.configure_command(engine_command(*paths, "--enable-log-requests"), **ENGINE_KEYS)
    yield g


@pytest.fixture(scope="module")
def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x",
                         max_retries=0, timeout=REQUEST_TIMEOUT_S)


def post(gw: Gateway, path: str, body: dict[str, Any],
         timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[int, dict[str, str], bytes]:
    """POST JSON as clients do: unlike the fake, vLLM answers 400 without the content type."""
    return gw.request("POST", path, body, headers={"Content-Type": "application/json"},
                      timeout_s=timeout_s)


def hi(max_tokens: int = 3) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}


def sse_events(body: bytes) -> list[str]:
    """The data of each server-sent event, `[DONE]` included."""
    return [e[len("data: "):] for e in body.decode().split("\n\n") if e.startswith("data: ")]


def dechunk(body: bytes) -> bytes:
    """A chunked body's data (as far as it came)."""
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


def streamed_text(events: list[str], field: str) -> str:
    """The text of a stream: `delta.content` of chat chunks, `text` of completion chunks."""
    assert events[-1] == "[DONE]", events[-3:]
    text = ""
    for event in events[:-1]:
        for choice in json.loads(event)["choices"]:
            part = choice["delta"].get("content") if field == "content" else choice.get("text")
            text += part or ""
    return text


def engine_running_requests(gw: Gateway) -> float:
    """`vllm:num_requests_running` from the engine's own /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.engine_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = [float(m.group(1)) for m in
              re.finditer(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.MULTILINE)]
    assert values, "no vllm:num_requests_running in the engine's /metrics"
    return sum(values)


def engine_finished_requests(gw: Gateway) -> dict[str, float]:
    """`vllm:request_success_total` from the engine's /metrics, by finished_reason."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.engine_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts: dict[str, float] = {}
    for m in re.finditer(r'^vllm:request_success_total\{[^}]*finished_reason="([^"]+)"[^}]*\} (\S+)$',
                         text, re.MULTILINE):
        counts[m.group(1)] = counts.get(m.group(1), 0.0) + float(m.group(2))
    return counts


# ---- one engine, started by the first request ----


class PhaseWatcher:
    """Polls /gateway/status while a start runs; every phase it showed, in order."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.shown: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.is_set():
            phase = self.gw.status().get("start_phase")
            if phase and (not self.shown or self.shown[-1] != phase):
                self.shown.append(phase)
            self.done.wait(0.3)

    def stop(self) -> list[str]:
        self.done.set()
        self.thread.join()
        return self.shown


def test_first_request_waits_through_the_real_cold_start(gw: Gateway) -> None:
    assert gw.active("vllm.service") == "inactive"
    code, _, _ = gw.request("GET", "/gateway/status")  # the shim runs before the start
    assert code == 200
    watcher = PhaseWatcher(gw)
    t0 = time.monotonic()
    try:
        code, headers, body = post(gw, "/v1/chat/completions", hi(5), COLD_START_TIMEOUT_S)
    finally:
        phases = watcher.stop()
    took = time.monotonic() - t0
    print(f"\nphases shown: {phases}")
    # something from the first second, only forward, no compiling with --enforce-eager
    assert phases and phases[0] == "starting process", phases
    assert [PHASE_NAMES.index(p) for p in phases] == sorted({PHASE_NAMES.index(p) for p in phases})
    assert "compiling" not in phases
    assert "loading weights" in phases or "profiling memory" in phases, phases
    assert code == 200, body
    assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    cold_ms = int(headers["x-vllm-gateway-cold-start-ms"])
    print(f"\ncold start {cold_ms} ms; first answer after {took:.1f} s")
    assert 10_000 < cold_ms <= took * 1000 + 1000
    logged = re.findall(r"cold_start_ms=(\d+)", gw.journal("vllm-gateway"))
    assert logged and abs(int(logged[-1]) - cold_ms) <= 1, logged
    st = gw.status()
    assert st["state"] == "ready"
    assert st["last_cold_start_s"] > 10
    assert gw.active("vllm.service") == "active"
    # the next request is warm: no cold-start header
    code, headers, _ = post(gw, "/v1/chat/completions", hi())
    assert code == 200 and "x-vllm-gateway-cold-start-ms" not in headers


def test_chat_completions_models_through_the_openai_client(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=60, extra_body=forced(PLAIN_TEXT))
    assert whole.choices[0].message.content == PLAIN_TEXT
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.completion_tokens > 0

    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=60, stream=True, extra_body=forced(PLAIN_TEXT)))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == PLAIN_TEXT
    assert len(pieces) > 1  # token by token, not one blob
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "stop"

    completion = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=60, extra_body=forced(PLAIN_TEXT))
    assert completion.choices[0].text == PLAIN_TEXT

    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=60, stream=True,
        extra_body=forced(PLAIN_TEXT)) if c.choices)
    assert streamed == PLAIN_TEXT

    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_completions_models_through_raw_http(gw: Gateway) -> None:
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 60, **forced(PLAIN_TEXT)}
    code, headers, body = post(gw, "/v1/chat/completions", chat)
    assert code == 200, body
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["choices"][0]["message"]["content"] == PLAIN_TEXT

    code, headers, body = post(gw, "/v1/chat/completions", {**chat, "stream": True})
    assert code == 200, body
    assert headers["content-type"].startswith("text/event-stream")
    assert streamed_text(sse_events(body), "content") == PLAIN_TEXT

    completion = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 60, **forced(PLAIN_TEXT)}
    code, _, body = post(gw, "/v1/completions", completion)
    assert code == 200, body
    assert json.loads(body)["choices"][0]["text"] == PLAIN_TEXT
    code, _, body = post(gw, "/v1/completions", {**completion, "stream": True})
    assert code == 200, body
    assert streamed_text(sse_events(body), "text") == PLAIN_TEXT

    code, _, body = gw.request("GET", "/v1/models")
    assert code == 200, body
    assert [m["id"] for m in json.loads(body)["data"]] == ["tiny"]


def streamed_calls(chunks: list[Any]) -> tuple[str, dict[int, dict[str, str]]]:
    """The content and the tool calls of a streamed chat completion."""
    calls: dict[int, dict[str, str]] = {}
    content = ""
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function is not None:
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
    return content, calls


def ask_weather() -> list[Any]:
    return [{"role": "user", "content": "What is the weather in Tokyo?"}]


def test_real_tool_call_text_becomes_tool_calls_whole(client: openai.OpenAI) -> None:
    # No tool_choice: the implied "auto" must reach vLLM (started without a tool
    # parser) as "none", or vLLM answers 400.
    reply = client.chat.completions.create(
        model="tiny", messages=ask_weather(), tools=TOOLS,
        max_tokens=200, extra_body=forced(TOOL_CALL_TEXT))
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert not choice.message.content
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    assert calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Tokyo"}


def test_real_tool_call_text_becomes_tool_calls_streamed(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="tiny", messages=ask_weather(), tools=TOOLS,
        max_tokens=200, stream=True, extra_body=forced(TOOL_CALL_TEXT)))
    content, calls = streamed_calls(chunks)
    assert "TOOLCALL" not in content and "<" not in content, content
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Tokyo"}
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "tool_calls"


ABORT_LOG_WAIT_S = 60
# As long as the tiny model's positions allow (well under a second of
# decoding on an idle machine), so that the client leaves while vLLM still
# generates. Where vLLM decoded the whole answer before the close reached
# it, it counts one more request finished by length and has nothing to
# abort: the scenario is then tried again, until an attempt ends otherwise
# or DISCONNECT_TRYING_S have passed. On these 2-core machines a process
# can stand still for 1.2-2.4 s while vLLM decodes (a process sleeping
# 1 ms at a time beside a loop of such streams saw about one such gap a
# second), and several attempts in a row can meet one.
DISCONNECT_MAX_TOKENS = 1000
DISCONNECT_TRYING_S = 60


def _leave_mid_stream(gw: Gateway) -> tuple[str, float]:
    """Start a long stream, read its first event and close the connection at
    once; the request's id and when it was closed."""
    body = json.dumps({
        "model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": DISCONNECT_MAX_TOKENS, "ignore_eos": True,
    }).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=REQUEST_TIMEOUT_S) as s:
        s.sendall(head + body)
        got = b""
        while b"data: {" not in got or b"\n\n" not in got.split(b"data: {", 1)[1]:
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    closed = time.monotonic()
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    first = json.loads(got.split(b"data: ", 1)[1].split(b"\n\n", 1)[0])
    return first["id"], closed


def test_client_disconnect_mid_stream_aborts_the_request_in_vllm(gw: Gateway) -> None:
    def aborted(request_id: str) -> bool:
        return any("abort" in line.lower() and request_id in line
                   for line in gw.journal("vllm").splitlines())

    trying_until = time.monotonic() + DISCONNECT_TRYING_S
    decoded_all = 0
    by_length = engine_finished_requests(gw).get("length", 0.0)
    while True:
        request_id, closed = _leave_mid_stream(gw)
        wait_until(lambda: engine_running_requests(gw) == 0, ABORT_LOG_WAIT_S,
                   f"vLLM to end {request_id}")
        after = engine_finished_requests(gw).get("length", 0.0)
        if after == by_length:
            break  # ended otherwise than by decoding it all: aborted
        by_length = after
        decoded_all += 1
        if time.monotonic() > trying_until:
            break  # the wait below fails, and says how the last one ended
    print(f"\n{decoded_all} attempt(s) decoded whole before the close reached vLLM")
    # vLLM notices the disconnect between two tokens and journald files the
    # line later still: on a loaded machine that took over 10 s. The wait
    # ends at the line; the bound is only for a vLLM that never aborts.
    try:
        wait_until(lambda: aborted(request_id), ABORT_LOG_WAIT_S, f"vLLM to log the abort of {request_id}")
    except AssertionError as e:
        # what vLLM and the gateway said of this request, and how vLLM's requests finished
        said = [line for line in gw.journal("vllm").splitlines() if request_id in line]
        ours = [line for line in gw.journal("vllm-gateway").splitlines()
                if request_id.removeprefix("chatcmpl-") in line]
        raise AssertionError(f"{e}\nvLLM's lines on it: {said}\nthe gateway's: {ours}\n"
                             f"engine: {engine_finished_requests(gw)}") from None
    took = time.monotonic() - closed
    assert engine_running_requests(gw) == 0
    print(f"\nabort of {request_id} logged {took:.2f} s after the client left")
    # the engine is still fine afterwards
    assert post(gw, "/v1/chat/completions", hi())[0] == 200


# Enums and no other keys: the tiny model's strings are noise, which only
# a schema that leaves no choice makes valid.
CITY_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Tokyo", "Paris"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME_TOOL: Any = {"type": "function", "function": {
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "JST"]}},
                   "required": ["zone"], "additionalProperties": False}}}
NAMED_TIME: Any = {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize("choice", ["required", NAMED_TIME], ids=["required", "named"])
def test_tool_choice_the_engine_cannot_parse_is_forced_into_calls(client: openai.OpenAI, choice: Any) -> None:
    """Without a parser vLLM refuses both; the gateway has the engine write
    calls in the format and rewrites them. The tiny model writes noise, so
    only the constraint makes these calls."""
    allowed = {"get_time"} if choice is NAMED_TIME else {"get_weather", "get_time"}
    reply = client.chat.completions.create(
        model="tiny", messages=ask_weather(), tools=[CITY_TOOL, TIME_TOOL], tool_choice=choice,
        max_tokens=200, temperature=0)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls", reply.choices[0]
    assert not message.content and message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.function.name in allowed
        assert json.loads(call.function.arguments) in (
            [{"city": "Tokyo"}, {"city": "Paris"}] if call.function.name == "get_weather"
            else [{"zone": "UTC"}, {"zone": "JST"}])
    if choice is NAMED_TIME:
        assert len(message.tool_calls) == 1

    chunks = list(client.chat.completions.create(
        model="tiny", messages=ask_weather(), tools=[CITY_TOOL, TIME_TOOL], tool_choice=choice,
        max_tokens=200, temperature=0, stream=True))
    content, calls = streamed_calls(chunks)
    assert not content and calls, content
    assert {c["name"] for c in calls.values()} <= allowed
    assert all(isinstance(json.loads(c["arguments"]), dict) for c in calls.values())
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "tool_calls"


def test_a_named_function_that_was_not_offered_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model="tiny", messages=ask_weather(), tools=[CITY_TOOL],
                                       tool_choice=NAMED_TIME, max_tokens=20)


def test_vllms_fastapi_errors_reach_clients_in_openais_shape(gw: Gateway, client: openai.OpenAI) -> None:
    # vLLM answers {"detail": "Not Found"} for embeddings on a generating model
    code, _, body = post(gw, "/v1/embeddings", {"model": "tiny", "input": "hello"})
    assert code == 404, body
    assert json.loads(body) == {"error": {"message": "Not Found", "type": "invalid_request_error",
                                          "param": None, "code": None}}
    with pytest.raises(openai.NotFoundError) as raised:
        client.embeddings.create(model="tiny", input="hello")
    # the SDK reads OpenAI's shape: the error object, its message
    assert raised.value.body == {"message": "Not Found", "type": "invalid_request_error",
                                 "param": None, "code": None}
    assert raised.value.message.endswith("Not Found")
    # vLLM's own OpenAI-shaped errors pass unchanged
    code, _, body = post(gw, "/v1/chat/completions", hi(100_000))
    error = json.loads(body)["error"]
    assert code == 400 and str(MAX_MODEL_LEN) in error["message"]
    assert not error["message"].startswith("vllm-gateway")


# ---- these change the configuration: last ----


def test_a_stop_cuts_an_open_stream_and_vllm_exits_at_once(gw: Gateway) -> None:
    """vLLM waits for open connections before it exits: the gateway closes
    its own after the grace (0 s here), so the unit is gone in seconds, not
    after stop_timeout (20 s), and the client learns why."""
    # 32 choices of 480 tokens: on an idle machine one alone ends within a second
    body = json.dumps({"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 480, "ignore_eos": True, "n": 32}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: real-stop\r\n"
            f"Connection: close\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=REQUEST_TIMEOUT_S) as s:
        s.sendall(head + body)
        got = b""
        while b"data: {" not in got:
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
        t0 = time.monotonic()
        code, _, answer = gw.request("POST", "/gateway/stop", timeout_s=60)
        stopped = time.monotonic() - t0
        while chunk := s.recv(65536):
            got += chunk
    assert code == 200, answer
    print(f"\nstop with a stream open took {stopped:.1f} s")
    assert gw.active("vllm.service") == "inactive"
    assert stopped < 8, stopped  # stop_timeout is 20 s
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    events = sse_events(dechunk(body))
    assert events and events[-1] != "[DONE]", "the stream ended before the stop: it cannot show the cut"
    assert "stopped by vllm-gateway stop" in json.loads(events[-1])["error"]["message"]
    wait_until(lambda: "outcome=stopped" in gw.journal("vllm-gateway"), 10, "the cut request's journal line")
    line = [x for x in gw.journal("vllm-gateway").splitlines() if "id=real-stop" in x]
    assert line and "outcome=stopped" in line[-1], line


def test_a_refused_sleep_mode_is_remembered_across_a_shim_restart(
    gw: Gateway, paths: tuple[str, str],
) -> None:
    """vLLM's CPU build refuses --enable-sleep-mode. The first start learns
    it and starts again without; a new shim knows it from the state file."""
    gw.configure_command(engine_command(*paths, "--enable-log-requests"), **ENGINE_KEYS, sleep_after="1m")
    refusals = gw.journal("vllm-gateway").count("refused sleep mode")
    t0 = time.monotonic()
    code, headers, body = post(gw, "/v1/chat/completions", hi(), 2 * COLD_START_TIMEOUT_S)
    waited = time.monotonic() - t0
    assert code == 200, body
    st = gw.status()
    print(f"\nrefusal and restart: the client waited {waited:.1f} s; status: {st['last_cold_start_s']} s")
    assert st["sleep_refused"] == "Sleep mode is not supported on current platform."
    assert st["sleep_enabled"] is False
    assert st["last_error"].startswith("sleep mode refused") and st["last_error_past"] is True
    assert "^" not in st["last_error"]
    # the cold start reported is what the client waited: both starts
    assert abs(int(headers["x-vllm-gateway-cold-start-ms"]) / 1000 - st["last_cold_start_s"]) < 0.5
    assert st["last_cold_start_s"] <= waited + 0.1 and st["expected_start_s"] < st["last_cold_start_s"]
    assert "sleep=no" in gw.unit_prop("vllm-gateway.service", "StatusText")
    assert gw.journal("vllm-gateway").count("refused sleep mode") == refusals + 1

    gw.sb.systemctl("stop", "vllm-gateway.service", "vllm.service")
    code, _, body = post(gw, "/v1/chat/completions", hi(), COLD_START_TIMEOUT_S)
    assert code == 200, body
    assert gw.journal("vllm-gateway").count("refused sleep mode") == refusals + 1
    started = [x for x in gw.journal("vllm-gateway").splitlines() if "starting engine main" in x]
    assert "--enable-sleep-mode" not in started[-1]
    st = gw.status()
    assert st["sleep_refused"] == "Sleep mode is not supported on current platform."
    assert st["last_error"] is None




def cgroup_pids(gw: Gateway, unit: str) -> list[int]:
    group = gw.sb.run(["systemctl", "--user", "show", "-P", "ControlGroup", unit]).stdout.strip()
    assert group, f"{unit} has no control group"
    # hybrid hierarchy (named systemd v1 tree), then pure cgroup2
    for root in ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        done = gw.sb.run(["cat", f"{root}{group}/cgroup.procs"], check=False)
        if done.returncode == 0 and done.stdout.strip():
            return [int(p) for p in done.stdout.split()]
    raise AssertionError(f"no cgroup.procs for {group} inside the sandbox")


def test_idle_timer_stops_real_vllm_and_every_process_of_its_cgroup(
    gw: Gateway, paths: tuple[str, str],
) -> None:
    assert post(gw, "/v1/chat/completions", hi(), COLD_START_TIMEOUT_S)[0] == 200
    pids = cgroup_pids(gw, "vllm.service")
    # API server, resource tracker, engine core, worker
    assert len(pids) >= 3, pids
    print(f"\nvllm.service runs {len(pids)} processes: {pids}")
    assert all(gw.alive_in_sandbox(p) for p in pids)
    # The idle check reads the configuration on every tick: a short stop_after
    # applies to the running engine without a restart.
    table = {"command": engine_command(*paths, "--enable-log-requests"), "port": gw.engine_port,
             "models": ["tiny"], **ENGINE_KEYS, "stop_after": "5s"}
    gw.sb.write_file(CONFIG.replace("~", gw.home), "[engines.main]\n" + "".join(
        f"{k} = {toml_value(v)}\n" for k, v in table.items()))
    t0 = time.monotonic()
    wait_until(lambda: gw.active("vllm.service") in ("inactive", "failed"), 60,
               "the idle timer to stop the engine")
    print(f"\nidle stop took {time.monotonic() - t0:.1f} s after stop_after became 5 s")
    assert gw.active("vllm.service") == "inactive", gw.journal("vllm")[-3000:]
    for pid in pids:
        assert not gw.alive_in_sandbox(pid), f"process {pid} of vLLM outlived its unit"
    assert "stopping vllm.service: idle" in gw.journal("vllm-gateway-idle")
    wait_until(lambda: gw.status()["state"] == "stopped", 10, "the shim to see the stop")


def test_start_failure_answers_503_with_vllms_own_error(gw: Gateway, paths: tuple[str, str]) -> None:
    gw.configure_command(engine_command(paths[0], "/nonexistent/model"), **ENGINE_KEYS)
    t0 = time.monotonic()
    code, headers, body = post(gw, "/v1/chat/completions", hi(), COLD_START_TIMEOUT_S)
    took = time.monotonic() - t0
    print(f"\nstart failure answered after {took:.1f} s")
    assert code == 503, body
    message = json.loads(body)["error"]["message"]
    assert "HFValidationError" in message or "Repo id" in message, message
    assert "/nonexistent/model" in message
    assert int(headers["retry-after"]) >= 1
    assert took < 60  # not the 5-minute start timeout
    assert gw.status()["state"] == "failed"

