from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shim.toolcalls import (
    FORMAT_NAMES,
    StreamRewriter,
    ToolCallFormat,
    ToolChoiceError,
    adapt_request,
    calls_constraint,
    get_format,
    rewrite_body,
)

NEMOTRON = get_format("nemotron")
HERMES = get_format("hermes")
MISTRAL = get_format("mistral")
assert NEMOTRON and HERMES and MISTRAL
FORMATS = [NEMOTRON, HERMES, MISTRAL]

Call = tuple[str, dict[str, Any]]


def block(fmt: ToolCallFormat, calls: list[Call]) -> str:
    """The text a model of this format writes for these calls."""
    objs = [{"name": n, "arguments": a} for n, a in calls]
    if fmt.name == "hermes":
        return "".join(f"<tool_call>\n{json.dumps(o, ensure_ascii=False)}\n</tool_call>" for o in objs)
    if fmt.name == "mistral":
        return "[TOOL_CALLS]" + json.dumps(objs, ensure_ascii=False)
    return "<TOOLCALL>" + json.dumps(objs, ensure_ascii=False) + "</TOOLCALL>"


# -- a vLLM-shaped stream and what an OpenAI client makes of it --


def chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0, **extra: Any) -> bytes:
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "nemotron",
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def vllm_stream(pieces: list[str], finish: str = "stop") -> bytes:
    return (
        chunk({"role": "assistant", "content": ""})
        + b"".join(chunk({"content": p}) for p in pieces)
        + chunk({"content": ""}, finish)
        + b"data: [DONE]\n\n"
    )


def run_stream(fmt: ToolCallFormat, data: bytes, cuts: list[int], rid: str = "-") -> bytes:
    rewriter = StreamRewriter(fmt, rid)
    out = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out.append(rewriter.feed(data[start:cut]))
        start = max(start, cut)
    out.append(rewriter.end())
    made = [c for i in range(4) for c in client_view(b"".join(out), i)[1] if c[0].startswith("call_")]
    assert rewriter.tool_calls == len(made)
    return b"".join(out)


def client_view(out: bytes, index: int = 0) -> tuple[str, list[tuple[str, str, str]], str | None, bool]:
    """Of choice `index`: (content, [(id, name, arguments)], finish_reason, saw [DONE])."""
    content = ""
    calls: dict[int, list[str]] = {}
    finish = None
    done = False
    for event in out.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not event or event.startswith(b":"):
            continue
        assert event.startswith(b"data: "), event
        payload = event[6:]
        if payload == b"[DONE]":
            done = True
            continue
        try:
            choices = json.loads(payload)["choices"]
        except ValueError:
            continue  # passed on as it came
        for choice in choices:
            if choice["index"] != index:
                continue
            delta = choice["delta"]
            content += delta.get("content") or ""
            for tc in delta.get("tool_calls") or []:
                slot = calls.setdefault(tc["index"], ["", "", ""])
                slot[0] += tc.get("id", "")
                slot[1] += tc.get("function", {}).get("name", "")
                slot[2] += tc.get("function", {}).get("arguments", "")
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    assert sorted(calls) == list(range(len(calls)))
    return content, [tuple(calls[i]) for i in sorted(calls)], finish, done  # type: ignore[misc]


def whole_body(content: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "nemotron",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        },
        ensure_ascii=False,
    ).encode()


def named(calls: list[tuple[str, str, str]]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, json.loads(args)) for _, name, args in calls]


# -- formats and requests --


def test_get_format() -> None:
    assert get_format("off") is None
    assert FORMAT_NAMES == ("off", "nemotron", "hermes", "mistral")
    for name in FORMAT_NAMES[1:]:
        fmt = get_format(name)
        assert fmt is not None and fmt.name == name
    with pytest.raises(ValueError, match="nemotron"):
        get_format("llama")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "messages", "stream", "skip_special_tokens", "x", "é"]),
                       json_values, max_size=5),
       st.sampled_from([(), ("auto",), (None,)]), st.booleans(),
       st.sampled_from([b"", b" ", b"\n", b" \r\n\t"]))
def test_an_adapted_request_is_the_request_asking_for_the_calls_as_text(
    members: dict[str, Any], choice: tuple[str | None, ...], ascii_only: bool, trailer: bytes
) -> None:
    # Whether the two members are appended to the client's bytes or the
    # body is written anew, the engine reads the same request.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    obj = {**members, "tools": tools, **({"tool_choice": choice[0]} if choice else {})}
    body = json.dumps(obj, ensure_ascii=ascii_only).encode() + trailer
    got = json.loads(adapt_request(body, NEMOTRON))
    assert got == {**obj, "skip_special_tokens": False, "tool_choice": "none"}
    if not choice and "skip_special_tokens" not in obj:
        assert adapt_request(body, NEMOTRON).startswith(body.rstrip()[:-1])  # the client's bytes, as sent


def test_adapt_request() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for extra in ({}, {"tool_choice": "auto"}):
        body = json.dumps({"model": "m", "tools": tools, **extra, "stream": True}).encode()
        out = json.loads(adapt_request(body, NEMOTRON))
        assert out["tool_choice"] == "none"
        assert out["tools"] == tools and out["stream"] is True
        # the tags may be special tokens, which the engine drops unless told not to
        assert out["skip_special_tokens"] is False
    named = {"type": "function", "function": {"name": "f"}}
    for choice in ("required", named):
        asked = {"model": "m", "tools": tools, "tool_choice": choice, "skip_special_tokens": True}
        out = json.loads(adapt_request(json.dumps(asked).encode(), NEMOTRON))
        # vLLM refuses these without a parser: "none", with the calls forced by a structured output
        spec = json.loads(out.pop("structured_outputs")["structural_tag"])
        assert spec == calls_constraint(NEMOTRON, tools, choice)
        assert out == {**asked, "tool_choice": "none", "skip_special_tokens": False}
        # a client's own constraint wins
        own = {**asked, "structured_outputs": {"regex": "x"}}
        out = json.loads(adapt_request(json.dumps(own).encode(), NEMOTRON))
        assert out["structured_outputs"] == {"regex": "x"} and out["tool_choice"] == "none"
    keep = [
        {"model": "m", "tools": tools, "tool_choice": "none"},
        {"model": "m", "messages": [{"role": "user", "content": "東京"}]},
        {"model": "m", "tool_choice": "auto"},
        [1, 2],
    ]
    for obj in keep:
        body = json.dumps(obj).encode()
        assert adapt_request(body, NEMOTRON) is body
    for bad in (b"{", b"\xff\xfe", b""):
        assert adapt_request(bad, NEMOTRON) is bad


# -- whole bodies --


def test_rewrite_body_nemotron() -> None:
    text = 'Let me check. <TOOLCALL>[{"name": "get_weather", "arguments": {"city": "東京"}}]</TOOLCALL>'
    out, n = rewrite_body(whole_body(text), NEMOTRON, "r1")
    assert n == 1
    obj = json.loads(out)
    assert list(obj) == ["id", "object", "model", "choices", "usage"]
    assert obj["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    choice = obj["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert list(message) == ["role", "content", "tool_calls"]
    assert message["content"] == "Let me check. "
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) >= 29
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "東京"}'}


def test_rewrite_body_only_call_gives_null_content_and_keeps_text_after() -> None:
    out, _ = rewrite_body(whole_body(' <TOOLCALL>[{"name": "f", "arguments": {}}]</TOOLCALL>\n'), NEMOTRON)
    assert json.loads(out)["choices"][0]["message"]["content"] is None
    out, _ = rewrite_body(whole_body('a<TOOLCALL>[{"name": "f", "arguments": {}}]</TOOLCALL>b'), NEMOTRON)
    assert json.loads(out)["choices"][0]["message"]["content"] == "ab"


def test_rewrite_body_several_calls_and_string_arguments() -> None:
    text = (
        '<TOOLCALL>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": "{\\"y\\": [2]}"},'
        ' {"name": "c"}]</TOOLCALL>'
    )
    out, n = rewrite_body(whole_body(text), NEMOTRON)
    assert n == 3
    calls = json.loads(out)["choices"][0]["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("a", {"x": 1}),
        ("b", {"y": [2]}),
        ("c", {}),
    ]
    assert len({c["id"] for c in calls}) == 3


def test_rewrite_body_passes_other_bodies_untouched() -> None:
    plain = whole_body("No tools here: 1 < 2 and [x].")
    assert rewrite_body(plain, NEMOTRON) == (plain, 0)
    has_calls = json.dumps(
        {
            "choices": [
                {
                    "message": {
                        "content": '<TOOLCALL>[{"name": "f", "arguments": {}}]</TOOLCALL>',
                        "tool_calls": [{"id": "x", "type": "function", "function": {}}],
                    }
                }
            ]
        }
    ).encode()
    assert rewrite_body(has_calls, NEMOTRON)[0] is has_calls
    for odd in (b"", b"<TOOLCALL>", b'{"choices": 3, "x": "<TOOLCALL>"}', b'["<TOOLCALL>"]'):
        assert rewrite_body(odd, NEMOTRON) == (odd, 0)


MALFORMED = [
    '<TOOLCALL>[{"name": "f", "arguments": {"a": 1}]</TOOLCALL>',  # bad JSON
    '<TOOLCALL>[{"name": "f", "arguments": {"a": 1',  # unclosed at the end
    '<TOOLCALL>[{"arguments": {"a": 1}}]</TOOLCALL>',  # no name
    '<TOOLCALL>[{"name": "f", "arguments": [1]}]</TOOLCALL>',  # arguments not an object
    "<TOOLCALL>not json</TOOLCALL>",
    "<TOOLCALL>[]</TOOLCALL>",
]


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_passes_as_content(bad: str, caplog: pytest.LogCaptureFixture) -> None:
    text = "before " + bad + " after"
    with caplog.at_level(logging.WARNING, logger="vllm_gateway.toolcalls"):
        body = whole_body(text)
        assert rewrite_body(body, NEMOTRON, "req-77") == (body, 0)
    assert "req-77" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vllm_gateway.toolcalls"):
        data = vllm_stream([text[i : i + 3] for i in range(0, len(text), 3)])
        content, calls, finish, done = client_view(run_stream(NEMOTRON, data, [], "req-78"))
    assert (content, calls, finish, done) == (text, [], "stop", True)
    assert "req-78" in caplog.text


def test_later_malformed_call_keeps_the_first_and_the_text(caplog: pytest.LogCaptureFixture) -> None:
    text = '<TOOLCALL>[{"name": "a", "arguments": {}}, {"nam": 1}]</TOOLCALL>'
    out, n = rewrite_body(whole_body(text), NEMOTRON, "r9")
    message = json.loads(out)["choices"][0]["message"]
    assert n == 1 and message["tool_calls"][0]["function"]["name"] == "a"
    assert message["content"] == ', {"nam": 1}]</TOOLCALL>'
    content, calls, finish, _ = client_view(run_stream(NEMOTRON, vllm_stream(list(text)), []))
    assert content == message["content"] and named(calls) == [("a", {})] and finish == "tool_calls"
    assert "r9" in caplog.text


# -- streams --


def test_stream_nemotron_split_tags() -> None:
    pieces = ["I'll look. ", "<", "TOOLCALL", ">[", '{"name": "get_weather", "arguments": ']
    pieces += ['{"city": "Tokyo"}', "}]</", "TOO", "LCALL", ">"]
    out = run_stream(NEMOTRON, vllm_stream(pieces), [])
    content, calls, finish, done = client_view(out)
    assert content == "I'll look. "
    assert named(calls) == [("get_weather", {"city": "Tokyo"})]
    assert calls[0][0].startswith("call_") and len(calls[0][0]) >= 29
    assert finish == "tool_calls" and done
    # vLLM's streaming shape: a start delta with the name, then arguments.
    deltas = [
        json.loads(e[6:])["choices"][0]["delta"] for e in out.split(b"\n\n") if e.startswith(b"data: {")
    ]
    starts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert starts == [
        {
            "index": 0,
            "id": calls[0][0],
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        }
    ]
    header = json.loads(out.split(b"\n\n")[3][6:])
    assert (header["id"], header["model"], header["created"]) == ("chatcmpl-1", "nemotron", 1700000000)
    assert header["object"] == "chat.completion.chunk"


def test_stream_plain_text_passes_byte_for_byte() -> None:
    data = vllm_stream(["Hello", " 1 < 2", " and [x]", " 東京 😀"]) + b": comment\n\n"
    assert run_stream(NEMOTRON, data, []) == data
    assert run_stream(MISTRAL, data, list(range(len(data)))) == data


def test_stream_passes_engine_tool_calls_usage_and_junk() -> None:
    engine_call = chunk(
        {"tool_calls": [{"index": 0, "id": "x", "type": "function", "function": {"name": "f"}}]}
    )
    usage = b'data: {"id":"chatcmpl-1","choices":[],"usage":{"total_tokens":3}}\n\n'
    odd_index = (
        b'data: {"id":"c","choices":[{"index":"1","delta":{"content":"<TOOLCALL>[{\\"name\\": \\"f\\"}]'
        b'</TOOLCALL>"},"finish_reason":null}]}\n\n'
    )
    junk = b"data: {not json <\n\n"
    data = engine_call + usage + odd_index + junk + b"data: [DONE]\n\n"
    assert run_stream(NEMOTRON, data, []) == data


def test_stream_with_several_choices_rewrites_each() -> None:
    """n=2: vLLM sends one choice a chunk, the choices' pieces interleaved."""
    texts = [
        "Let me check. " + block(NEMOTRON, [("get_weather", {"city": "Oslo"})]),
        "Plain answer, 1 < 2, <TOOL",  # held at the end: no finish_reason comes for it
        block(NEMOTRON, [("a", {"x": 1}), ("b", {})]),
    ]
    pieces = [[t[i : i + 5] for i in range(0, len(t), 5)] for t in texts]
    data = b"".join(chunk({"role": "assistant", "content": ""}, index=i) for i in range(3))
    for step in range(max(map(len, pieces))):
        for i, p in enumerate(pieces):
            if step < len(p):
                data += chunk({"content": p[step]}, index=i)
    data += chunk({"content": ""}, "stop", index=0) + chunk({"content": ""}, "stop", index=2)
    data += b"data: [DONE]\n\n"
    for cuts in ([], list(range(0, len(data), 7))):
        out = run_stream(NEMOTRON, data, cuts)
        first, second, third = (client_view(out, i) for i in range(3))
        assert first[0] == "Let me check. " and named(first[1]) == [("get_weather", {"city": "Oslo"})]
        assert first[2] == "tool_calls" and first[3]
        assert second[:3] == (texts[1], [], None)
        assert third[0] == "" and named(third[1]) == [("a", {"x": 1}), ("b", {})]
        assert third[2] == "tool_calls"
        ids = [c[0] for view in (first, third) for c in view[1]]
        assert len(set(ids)) == 3
        # the held tail of choice 1 goes out before [DONE], under its own index
        assert out.endswith(b"data: [DONE]\n\n")
        tail = json.loads(out.split(b"\n\n")[-3][6:])
        assert tail["choices"] == [{"index": 1, "delta": {"content": "<TOOL"}, "finish_reason": None}]


def test_stream_crlf_events() -> None:
    text = '<TOOLCALL>[{"name": "f", "arguments": {"a": "b"}}]</TOOLCALL>'
    data = vllm_stream([text[:7], text[7:]]).replace(b"\n", b"\r\n")
    out = run_stream(NEMOTRON, data, [])
    assert b"\r\n\r\n" in out
    _, calls, finish, done = client_view(out.replace(b"\r\n", b"\n"))
    assert named(calls) == [("f", {"a": "b"})] and finish == "tool_calls" and done


def test_stream_without_finish_chunk_flushes_held_text() -> None:
    data = chunk({"content": "a <TOOL"})
    out = run_stream(NEMOTRON, data, [])
    assert client_view(out)[0] == "a <TOOL"


def test_hermes_several_tags() -> None:
    text = "Sure." + block(HERMES, [("a", {"x": 1}), ("b", {"y": "😀"})]) + " done"
    content, calls, finish, _ = client_view(run_stream(HERMES, vllm_stream(list(text)), []))
    assert content == "Sure. done"
    assert named(calls) == [("a", {"x": 1}), ("b", {"y": "😀"})]
    assert finish == "tool_calls"


def test_mistral_runs_to_the_end() -> None:
    text = block(MISTRAL, [("a", {"x": 1}), ("b", {})])
    out, n = rewrite_body(whole_body(text), MISTRAL)
    assert n == 2 and json.loads(out)["choices"][0]["message"]["content"] is None
    content, calls, finish, _ = client_view(run_stream(MISTRAL, vllm_stream([text[:5], text[5:]]), []))
    assert (content, named(calls), finish) == ("", [("a", {"x": 1}), ("b", {})], "tool_calls")
    # A list that never closes is malformed: the text comes back.
    text = '[TOOL_CALLS][{"name": "a", "arguments": {}'
    assert client_view(run_stream(MISTRAL, vllm_stream([text]), []))[:2] == (text, [])


def test_ids_unique() -> None:
    text = block(NEMOTRON, [("f", {})] * 5)
    ids = [c[0] for c in client_view(run_stream(NEMOTRON, vllm_stream([text]), []))[1]]
    ids += [
        c["id"]
        for c in json.loads(rewrite_body(whole_body(text), NEMOTRON)[0])["choices"][0]["message"][
            "tool_calls"
        ]
    ]
    assert len(set(ids)) == 10 and all(i.startswith("call_") for i in ids)


# -- properties --

names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6) | st.sampled_from(["東京", "😀"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
call_lists = st.lists(
    st.tuples(names, st.dictionaries(st.text(max_size=5), json_values, max_size=3)),
    min_size=1,
    max_size=3,
)
plain = st.lists(
    st.sampled_from([*"ab <>[]{}\n東😀", "TOOL", "CALL", "tool_call", "<TOOL", "[TOOL_"]),
    max_size=12,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(FORMATS),
    plain,
    call_lists,
    plain,
    st.lists(st.integers(1, 6), min_size=1, max_size=40),
    st.lists(st.integers(0, 4000), max_size=12),
)
def test_any_split_same_calls_as_whole(
    fmt: ToolCallFormat,
    before: str,
    calls: list[Call],
    after: str,
    piece_sizes: list[int],
    cuts: list[int],
) -> None:
    # Keep the surrounding text from forming or breaking a tag by accident.
    before = before.replace(fmt.open_tag[0], "")
    after = after.replace(fmt.open_tag[0], "") if fmt.close_tag else ""
    text = before + block(fmt, calls) + after
    pieces = []
    i = 0
    for size in piece_sizes * (len(text) // max(1, sum(piece_sizes)) + 1):
        if i >= len(text):
            break
        pieces.append(text[i : i + size])
        i += size
    data = vllm_stream(pieces)
    expected_content = before + after
    expected = [(n, a) for n, a in calls]

    whole, count = rewrite_body(whole_body(text), fmt)
    message = json.loads(whole)["choices"][0]["message"]
    assert count == len(calls)
    assert message["content"] == (expected_content if expected_content.strip() else None)
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]
    ] == expected

    for split in ([], list(range(len(data))), [c for c in cuts if c < len(data)]):
        content, got, finish, done = client_view(run_stream(fmt, data, split))
        assert content == expected_content
        assert named(got) == expected
        assert [g[2] for g in got] == [c["function"]["arguments"] for c in message["tool_calls"]]
        assert finish == "tool_calls" and done


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(FORMATS), st.text(max_size=60), st.lists(st.integers(0, 400), max_size=6))
def test_text_never_lost(fmt: ToolCallFormat, text: str, cuts: list[int]) -> None:
    # Any text, tool call or not, comes out as the same calls and content.
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    data = vllm_stream(pieces)
    content, calls, _, done = client_view(run_stream(fmt, data, cuts))
    assert done
    whole, n = rewrite_body(whole_body(text), fmt)
    if not n:
        assert whole == whole_body(text)
        assert content == text and calls == []
    else:
        message = json.loads(whole)["choices"][0]["message"]
        assert message["content"] == (content if content.strip() else None)
        assert named(calls) == [
            (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]
        ]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FORMATS), st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=5))
def test_no_exception_escapes(fmt: ToolCallFormat, data: bytes, cuts: list[int]) -> None:
    run_stream_raw = StreamRewriter(fmt, "x")
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        run_stream_raw.feed(data[start:cut])
        start = max(start, cut)
    run_stream_raw.end()
    rewrite_body(data, fmt)
    try:
        adapt_request(data, fmt)
    except ToolChoiceError:
        pass
    prefix = b'data: {"choices":[{"index":0,"delta":{"content":"' + fmt.open_tag.encode()
    rewriter = StreamRewriter(fmt)
    rewriter.feed(prefix + data.replace(b"\n", b"") + b'"}}]}\n\n')
    rewriter.end()


# -- tool_choice "required" and a named function: the engine is made to write calls --

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now"}}]


def call_schema(name: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def json_schema(value: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": value, "max_whitespace_cnt": 1}


def test_required_makes_a_list_format_write_one_call_or_more_of_the_offered_functions() -> None:
    either = {"anyOf": [call_schema("get_weather", WEATHER), call_schema("now", {"type": "object"})]}
    assert calls_constraint(NEMOTRON, TOOLS, "required") == {"type": "structural_tag", "format": {
        "type": "tag", "begin": "<TOOLCALL>", "end": "</TOOLCALL>",
        "content": json_schema({"type": "array", "items": either, "minItems": 1}),
    }}
    assert calls_constraint(MISTRAL, TOOLS, "required", parallel=False) == {
        "type": "structural_tag", "format": {"type": "sequence", "elements": [
            {"type": "const_string", "value": "[TOOL_CALLS]"},
            json_schema({"type": "array", "items": either, "minItems": 1, "maxItems": 1}),
        ]}}


def test_a_named_function_is_the_only_one_and_called_once() -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert calls_constraint(NEMOTRON, TOOLS, named)["format"]["content"] == json_schema(
        {"type": "array", "items": call_schema("get_weather", WEATHER), "minItems": 1, "maxItems": 1})
    assert calls_constraint(HERMES, TOOLS, named) == {"type": "structural_tag", "format": {
        "type": "tag", "begin": "<tool_call>", "end": "</tool_call>",
        "content": json_schema(call_schema("get_weather", WEATHER))}}


def test_hermes_writes_one_tag_per_call() -> None:
    spec = calls_constraint(HERMES, TOOLS[:1], "required")["format"]
    assert spec == {"type": "plus", "content": {
        "type": "tag", "begin": "<tool_call>", "end": "</tool_call>",
        "content": json_schema(call_schema("get_weather", WEATHER))}}


@pytest.mark.parametrize(("tools", "choice", "why"), [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "'nope', which is not among the tools"),
    (TOOLS, {"type": "function"}, "tool_choice must be"),
    (TOOLS, {"type": "other", "function": {"name": "now"}}, "tool_choice must be"),
    (TOOLS, "sometimes", "is not supported"),
    ([], "required", "at least one function"),
    ([{"type": "function"}], "required", "at least one function"),
])
def test_a_choice_that_cannot_be_served_is_a_clear_error(tools: Any, choice: Any, why: str) -> None:
    with pytest.raises(ToolChoiceError, match=why):
        calls_constraint(NEMOTRON, tools, choice)
    body = json.dumps({"model": "m", "tools": tools or [{}], "tool_choice": choice}).encode()
    if choice == "sometimes":  # not one of OpenAI's: the engine answers it
        assert json.loads(adapt_request(body, NEMOTRON))["tool_choice"] == "sometimes"
        return
    with pytest.raises(ToolChoiceError):
        adapt_request(body, NEMOTRON)
