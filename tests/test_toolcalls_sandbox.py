"""Tool calls written as text, end to end: the installed gateway with
`tool_call_format = "nemotron"` in front of the fake engine, driven by the
official `openai` client the way an agent drives it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.gatewaying import HTTP_TIMEOUT_S, WEATHER_TOOL, Gateway, wait_until
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

ARGS = {"city": "東京 🌸"}
ONE_CALL = '<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "東京 🌸"}}]</TOOLCALL>'
TWO_CALLS = (
    'Let me check both. <TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
    '{"name": "get_weather", "arguments": {"city": "Oslo"}}]</TOOLCALL>'
)
# A "<" and a tail that begins the tag make the rewriter hold text back.
PLAIN = 'Sunny, 3 < 5 and <b>bold</b>; the tag <TOOL is not one, nor "<TOOLCALL".'
MALFORMED = '<TOOLCALL>[{"name": "get_weather", "arguments": {"city": }}]</TOOLCALL> sorry'
# As in Nemotron Nano v2's tokenizer, the tags are special tokens: the engine
# drops them from its output unless the request sets skip_special_tokens false.
SPECIAL_TOKENS = ["--special-tokens", "<TOOLCALL>,</TOOLCALL>"]


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    g = Gateway(sandbox)
    g.configure(["--log-requests", request_log(g), *SPECIAL_TOKENS], tool_call_format="nemotron")
    yield g


@pytest.fixture(scope="module")
def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x",
                         max_retries=0, timeout=HTTP_TIMEOUT_S)


def request_log(gw: Gateway) -> str:
    return f"{gw.home}/fake-vllm-requests.jsonl"


def received(gw: Gateway, marker: str) -> dict[str, Any]:
    """The body of the one request the engine received whose messages carry `marker`."""
    lines = gw.sb.run(["cat", request_log(gw)]).stdout.splitlines()
    bodies = [e["body"] for e in map(json.loads, lines) if marker in json.dumps(e["body"])]
    assert len(bodies) == 1, bodies
    body: dict[str, Any] = bodies[0]
    return body


def ask(marker: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is the weather? ({marker})"}]


def new_marker() -> str:
    return uuid.uuid4().hex


class Streamed:
    """A chat stream accumulated the way an agent accumulates it."""

    def __init__(self, stream: Any) -> None:
        self.chunks = list(stream)
        self.contents: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        for chunk in self.chunks:
            for choice in chunk.choices:
                delta = choice.delta
                if delta.content:
                    self.contents.append(delta.content)
                for tc in delta.tool_calls or []:
                    slot = self.calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                    if tc.id:
                        slot["id"] = tc.id
                    if tc.function is not None:
                        slot["name"] += tc.function.name or ""
                        slot["arguments"] += tc.function.arguments or ""

    @property
    def content(self) -> str:
        return "".join(self.contents)

    @property
    def finish_reason(self) -> str | None:
        last = [c for c in self.chunks if c.choices][-1]
        reason: str | None = last.choices[0].finish_reason
        return reason


def reply_body(reply: str, keep_special: bool) -> dict[str, Any]:
    """The fake engine's reply; `keep_special`: the client itself asks for the tags."""
    return {"fake_reply": reply, **({"skip_special_tokens": False} if keep_special else {})}


def stream_chat(client: openai.OpenAI, reply: str, marker: str, keep_special: bool = False,
                **kw: Any) -> Streamed:
    return Streamed(client.chat.completions.create(
        model="tiny", messages=ask(marker), stream=True,  # type: ignore[arg-type]
        extra_body=reply_body(reply, keep_special), **kw))


def whole_chat(client: openai.OpenAI, reply: str, marker: str, keep_special: bool = False, **kw: Any) -> Any:
    return client.chat.completions.create(
        model="tiny", messages=ask(marker),  # type: ignore[arg-type]
        extra_body=reply_body(reply, keep_special), **kw)


def test_whole_tool_call_through_the_openai_client(gw: Gateway, client: openai.OpenAI) -> None:
    marker = new_marker()
    reply = whole_chat(client, ONE_CALL, marker, tools=[WEATHER_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == ARGS
    assert calls[0].id.startswith("call_")
    # The engine has no tool parser: it got "none" in place of the implied "auto",
    # with the tools still there for its prompt, and was asked to keep the tags.
    sent = received(gw, marker)
    assert sent["tool_choice"] == "none"
    assert sent["tools"] == [WEATHER_TOOL]
    assert sent["skip_special_tokens"] is False


def test_explicit_auto_reaches_the_engine_as_none(gw: Gateway, client: openai.OpenAI) -> None:
    marker = new_marker()
    reply = whole_chat(client, ONE_CALL, marker, tools=[WEATHER_TOOL], tool_choice="auto")
    assert reply.choices[0].finish_reason == "tool_calls"
    assert received(gw, marker)["tool_choice"] == "none"


def test_streamed_tool_call_accumulates_like_an_agent(gw: Gateway, client: openai.OpenAI) -> None:
    marker = new_marker()
    s = stream_chat(client, ONE_CALL, marker, tools=[WEATHER_TOOL])
    assert len(s.chunks) > 2
    assert list(s.calls) == [0]
    call = s.calls[0]
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == ARGS
    assert call["id"] is not None and call["id"].startswith("call_")
    assert s.finish_reason == "tool_calls"
    for piece in s.contents:
        assert "<TOOLCALL" not in piece and "TOOLCALL>" not in piece
    assert "TOOLCALL" not in s.content and "TOO" not in s.content
    assert received(gw, marker)["tool_choice"] == "none"


def test_text_before_the_tag_streams_as_content_and_two_calls_get_two_indices(
    client: openai.OpenAI,
) -> None:
    s = stream_chat(client, TWO_CALLS, new_marker(), tools=[WEATHER_TOOL])
    assert s.content.strip() == "Let me check both."
    assert "<" not in s.content
    assert sorted(s.calls) == [0, 1]
    assert [s.calls[i]["name"] for i in (0, 1)] == ["get_weather", "get_weather"]
    assert [json.loads(s.calls[i]["arguments"]) for i in (0, 1)] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert s.calls[0]["id"] != s.calls[1]["id"]
    assert all(s.calls[i]["id"].startswith("call_") for i in (0, 1))
    assert s.finish_reason == "tool_calls"
    # the text came before the first call's delta
    first_call = next(k for k, c in enumerate(s.chunks) if c.choices and c.choices[0].delta.tool_calls)
    first_text = next(k for k, c in enumerate(s.chunks) if c.choices and c.choices[0].delta.content)
    assert first_text < first_call

    whole = whole_chat(client, TWO_CALLS, new_marker(), tools=[WEATHER_TOOL]).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert (whole.message.content or "").strip() == "Let me check both."
    assert [json.loads(c.function.arguments) for c in whole.message.tool_calls or []] == [
        {"city": "Paris"}, {"city": "Oslo"}]


def test_plain_text_passes_unchanged(client: openai.OpenAI) -> None:
    s = stream_chat(client, PLAIN, new_marker(), tools=[WEATHER_TOOL])
    assert s.content == PLAIN
    assert s.calls == {}
    assert s.finish_reason == "stop"

    whole = whole_chat(client, PLAIN, new_marker(), tools=[WEATHER_TOOL]).choices[0]
    assert whole.message.content == PLAIN
    assert not whole.message.tool_calls
    assert whole.finish_reason == "stop"

    # and without tools in the request at all
    assert stream_chat(client, PLAIN, new_marker()).content == PLAIN
    assert whole_chat(client, PLAIN, new_marker()).choices[0].message.content == PLAIN


def test_malformed_tool_text_arrives_as_content_and_is_logged(
    gw: Gateway, client: openai.OpenAI,
) -> None:
    rid_stream = f"malformed-stream-{new_marker()[:8]}"
    s = stream_chat(client, MALFORMED, new_marker(), tools=[WEATHER_TOOL],
                    extra_headers={"X-Request-Id": rid_stream})
    assert s.content == MALFORMED
    assert s.calls == {}
    assert s.finish_reason == "stop"  # the stream ran to its end

    rid_whole = f"malformed-whole-{new_marker()[:8]}"
    whole = whole_chat(client, MALFORMED, new_marker(), tools=[WEATHER_TOOL],
                       extra_headers={"X-Request-Id": rid_whole}).choices[0]
    assert whole.message.content == MALFORMED
    assert not whole.message.tool_calls
    assert whole.finish_reason == "stop"

    def warned(rid: str) -> bool:
        return any("malformed" in line and rid in line
                   for line in gw.journal("vllm-gateway").splitlines())

    wait_until(lambda: warned(rid_stream) and warned(rid_whole), 10,
               "the malformed-tool-call warnings in the gateway's journal")


@pytest.mark.parametrize("choice", [
    "required",
    {"type": "function", "function": {"name": "get_weather"}},
], ids=["required", "named"])
def test_tool_choice_required_or_named_reaches_the_engine_as_a_constraint(
    gw: Gateway, client: openai.OpenAI, choice: Any,
) -> None:
    """vLLM refuses both without a parser: the engine gets "none" and a
    structured output that makes it write calls (real vLLM obeys it; the
    fake ignores it and writes its reply)."""
    marker = new_marker()
    reply = whole_chat(client, ONE_CALL, marker, tools=[WEATHER_TOOL], tool_choice=choice)
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    sent = received(gw, marker)
    assert sent["tool_choice"] == "none"
    assert sent["tools"] == [WEATHER_TOOL]
    assert sent["skip_special_tokens"] is False
    tag = json.loads(sent["structured_outputs"]["structural_tag"])
    assert tag["type"] == "structural_tag" and tag["format"]["begin"] == "<TOOLCALL>"


@pytest.mark.parametrize("extra", [
    {"tools": [WEATHER_TOOL], "tool_choice": "none"},
    {},
], ids=["tool_choice_none", "no_tools"])
def test_no_tool_calls_when_the_client_allows_none(
    gw: Gateway, client: openai.OpenAI, extra: dict[str, Any],
) -> None:
    marker = new_marker()
    whole = whole_chat(client, ONE_CALL, marker, keep_special=True, **extra).choices[0]
    assert not whole.message.tool_calls
    assert whole.message.content == ONE_CALL
    assert whole.finish_reason == "stop"
    s = stream_chat(client, ONE_CALL, new_marker(), keep_special=True, **extra)
    assert s.calls == {}
    assert s.content == ONE_CALL
    # no calls to parse: the engine's output is left as the client asked for it
    marker = new_marker()
    plain = whole_chat(client, ONE_CALL, marker, **extra).choices[0].message.content
    assert plain == ONE_CALL.removeprefix("<TOOLCALL>").removesuffix("</TOOLCALL>")
    assert "skip_special_tokens" not in received(gw, marker)


def test_completions_are_never_rewritten(client: openai.OpenAI) -> None:
    kept = reply_body(ONE_CALL, keep_special=True)
    whole = client.completions.create(model="tiny", prompt="hi", extra_body=kept)
    assert whole.choices[0].text == ONE_CALL
    assert whole.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="tiny", prompt="hi", stream=True, extra_body=kept)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ONE_CALL
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


# Reconfigures the engine: keep it last in the module.
def test_off_passes_tool_text_through_raw(gw: Gateway, client: openai.OpenAI) -> None:
    gw.configure(["--log-requests", request_log(gw), *SPECIAL_TOKENS], tool_call_format="off")
    marker = new_marker()
    s = stream_chat(client, ONE_CALL, marker, keep_special=True)
    assert s.content == ONE_CALL
    assert s.calls == {}
    assert s.finish_reason == "stop"
    whole = whole_chat(client, ONE_CALL, new_marker(), keep_special=True).choices[0]
    assert whole.message.content == ONE_CALL
    assert not whole.message.tool_calls
    assert whole.finish_reason == "stop"
    # Without a format the request is not adapted either: an engine without a
    # parser refuses tools with the implied "auto", as vLLM does.
    marker = new_marker()
    with pytest.raises(openai.BadRequestError, match="auto"):
        whole_chat(client, ONE_CALL, marker, tools=[WEATHER_TOOL])
    assert "tool_choice" not in received(gw, marker)
