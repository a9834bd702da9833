"""Turn tool calls that a model writes as text into OpenAI ``tool_calls``.

Models such as Nemotron Nano v2 write
``<TOOLCALL>[{"name": "f", "arguments": {...}}]</TOOLCALL>`` in their output.
The engine runs without a tool-call parser, so the gateway rewrites the
engine's chat-completion responses on the way through: whole JSON bodies with
:func:`rewrite_body`, streams with :class:`StreamRewriter`; and it adapts
requests that carry ``tools`` so the engine accepts them
(:func:`adapt_request`).

No I/O here: bytes in, bytes out. Both paths run the same text scanner
(:class:`_Scanner`), so a text gives the same calls streamed or whole, under
any split of the stream. Each call is emitted as soon as its JSON object is
complete (a start delta with the name, then its arguments), not at the end of
the block. Tool-call text that turns out malformed is passed on as content,
never dropped, and logged.
"""

from __future__ import annotations

import json
import logging
import secrets
from abc import ABC
from typing import Any, Final

from shim.sse import SSEDecoder

__all__ = [
    "FORMAT_NAMES",
    "StreamRewriter",
    "ToolCallFormat",
    "adapt_request",
    "get_format",
    "rewrite_body",
]

log = logging.getLogger("vllm_gateway.toolcalls")


class RewriteError(Exception):
    """Internal: the tool-call text is malformed. Never escapes this module."""


# ---------------------------------------------------------------------------
# Formats


class ToolCallFormat(ABC):  # noqa: B024 - the attributes are the interface
    """How one model family writes tool calls as text.

    ``open_tag`` starts a block; ``close_tag`` ends it (None: the block runs to
    the end of the JSON payload and the generation). The payload is a JSON list
    of call objects (``accepts_list``) and/or one call object per block.
    """

    name: str = ""
    open_tag: str = ""
    close_tag: str | None = None
    accepts_list: bool = True

    def parse_call(self, obj: Any) -> tuple[str, str]:
        """One decoded call object -> (name, arguments as a JSON object string)."""
        if not isinstance(obj, dict):
            raise RewriteError("a call is not a JSON object")
        name = obj.get("name")
        if not isinstance(name, str) or not name:
            raise RewriteError('a call has no "name" string')
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError as exc:
                raise RewriteError("arguments given as a string are not JSON") from exc
        if not isinstance(args, dict):
            raise RewriteError("arguments are not a JSON object")
        return name, _dumps(args)

    def __repr__(self) -> str:
        return f"<ToolCallFormat {self.name}>"


class NemotronFormat(ToolCallFormat):
    name = "nemotron"
    open_tag = "<TOOLCALL>"
    close_tag = "</TOOLCALL>"


class HermesFormat(ToolCallFormat):
    """Hermes and Qwen: one object per tag, several tags possible."""

    name = "hermes"
    open_tag = "<tool_call>"
    close_tag = "</tool_call>"
    accepts_list = False


class MistralFormat(ToolCallFormat):
    """Mistral: ``[TOOL_CALLS]`` then a JSON list, no closing tag."""

    name = "mistral"
    open_tag = "[TOOL_CALLS]"
    close_tag = None


_FORMATS: Final[dict[str, ToolCallFormat]] = {
    f.name: f for f in (NemotronFormat(), HermesFormat(), MistralFormat())
}
FORMAT_NAMES: Final[tuple[str, ...]] = ("off", *_FORMATS)


def get_format(name: str) -> ToolCallFormat | None:
    """The format called ``name``; None for "off"; ValueError if unknown."""
    if name == "off":
        return None
    try:
        return _FORMATS[name]
    except KeyError:
        known = ", ".join(FORMAT_NAMES)
        raise ValueError(f"unknown tool call format {name!r}; known formats: {known}") from None


def _dumps(obj: Any) -> str:
    # One serialisation for every JSON text this module makes: Unicode kept as
    # is, vLLM's own separators for arguments (its parsers use json.dumps).
    return json.dumps(obj, ensure_ascii=False)


def _dumps_compact(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _new_call_id() -> str:
    # 24 random hex digits, as unique as OpenAI's own call ids.
    return "call_" + secrets.token_hex(12)


# ---------------------------------------------------------------------------
# Requests


def _with_members(body: bytes, members: bytes) -> bytes | None:
    """A JSON object's bytes (with at least one member) with `members`
    added at its end; None where its bytes do not end in its closing brace
    (then the caller serializes). The object was parsed: its last `}`,
    trailing white space aside, is its end."""
    end = body.rstrip(b" \t\r\n")
    if not end.endswith(b"}"):
        return None
    return end[:-1] + b"," + members + b"}"


def adapt_request(body: bytes, fmt: ToolCallFormat, parsed: dict[str, Any] | None = None) -> bytes:
    """Make a request with ``tools`` acceptable to an engine without a parser.

    The engine refuses tool_choice "auto" (explicit, or implied by ``tools``);
    with "none" it still renders the tools into the prompt, and the gateway
    parses the calls itself. The tags around a call are special tokens in
    some models (Nemotron Nano v2, Mistral, some Hermes), which the engine
    drops from the text by default: wherever calls may come, the request
    asks for them to be kept (``skip_special_tokens: false``, as vLLM's own
    parsers do). ``"required"`` and a named function, which vLLM refuses
    without a parser, go as "none" too, with a structured output that makes
    the engine write calls (``calls_constraint``); ToolChoiceError where the
    choice cannot be served. Anything else comes back as the same object.
    ``parsed``, where given, is the body already parsed (it is not changed).
    """
    obj: Any = parsed
    if obj is None:
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return body
    if not isinstance(obj, dict) or obj.get("tools") is None:
        return body
    choice = obj.get("tool_choice", "auto")
    if choice == "none":
        return body
    if "tool_choice" not in obj and "skip_special_tokens" not in obj:
        # The common case (tools, no choice): the two members appended to the
        # client's bytes, not the whole body serialized again, which costs
        # ~2 µs a KB of conversation on every turn of an agent's loop.
        spliced = _with_members(body, b'"skip_special_tokens":false,"tool_choice":"none"')
        if spliced is not None:
            return spliced
    obj = {**obj, "skip_special_tokens": False}
    if choice is None or choice == "auto":
        obj["tool_choice"] = "none"
    elif choice == "required" or isinstance(choice, dict):
        # vLLM refuses these without a parser; the gateway has the engine
        # write the calls in the format instead (a client's own constraint wins)
        spec = calls_constraint(fmt, obj.get("tools"), choice, obj.get("parallel_tool_calls") is not False)
        obj["tool_choice"] = "none"
        if "structured_outputs" not in obj:
            obj["structured_outputs"] = {"structural_tag": json.dumps(spec, ensure_ascii=False)}
    return _dumps_compact(obj)


# A tool call's JSON may hold one whitespace character at a time: enough for
# `": "` and newlines, while a constrained small model cannot fill its tokens
# with blanks.
MAX_CALL_WHITESPACE = 1


def calls_constraint(fmt: ToolCallFormat, tools: Any, choice: Any, parallel: bool = True) -> dict[str, Any]:
    """vLLM's structured output (an xgrammar structural tag) that makes the
    engine write only tool calls in `fmt`'s text form: one call or more of
    the offered functions (`choice` "required"), or of the one named
    (`{"type": "function", "function": {"name": ...}}`), each with its
    parameter schema. Raises ToolChoiceError for a choice that names no
    offered function."""
    functions = _offered(tools)
    if isinstance(choice, dict):
        named = choice.get("function")
        name = named.get("name") if isinstance(named, dict) else None
        if not isinstance(name, str) or choice.get("type", "function") != "function":
            raise ToolChoiceError('tool_choice must be "none", "auto", "required" or '
                                  '{"type": "function", "function": {"name": "..."}}')
        if name not in functions:
            raise ToolChoiceError(f"tool_choice names the function {name!r}, which is not among the tools "
                                  f"offered ({', '.join(functions) or 'none'})")
        functions = {name: functions[name]}
        parallel = False
    elif choice != "required":
        raise ToolChoiceError(f"tool_choice {choice!r} is not supported")
    if not functions:
        raise ToolChoiceError('tool_choice "required" needs at least one function in `tools`')
    calls = [{
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for name, params in functions.items()]
    one_call: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}

    def schema(value: dict[str, Any]) -> dict[str, Any]:
        return {"type": "json_schema", "json_schema": value, "max_whitespace_cnt": MAX_CALL_WHITESPACE}

    tag: dict[str, Any]
    if fmt.accepts_list:
        payload: dict[str, Any] = {"type": "array", "items": one_call, "minItems": 1}
        if not parallel:
            payload["maxItems"] = 1
        if fmt.close_tag is None:
            tag = {"type": "sequence",
                   "elements": [{"type": "const_string", "value": fmt.open_tag}, schema(payload)]}
        else:
            tag = {"type": "tag", "begin": fmt.open_tag, "content": schema(payload), "end": fmt.close_tag}
    else:
        tag = {"type": "tag", "begin": fmt.open_tag, "content": schema(one_call), "end": fmt.close_tag or ""}
        if parallel:
            tag = {"type": "plus", "content": tag}
    return {"type": "structural_tag", "format": tag}


def _offered(tools: Any) -> dict[str, dict[str, Any]]:
    """The offered functions' names and parameter schemas, in order."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools if isinstance(tools, list) else []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters")
        out[fn["name"]] = params if isinstance(params, dict) and params else {"type": "object"}
    return out


class ToolChoiceError(ValueError):
    """The request's tool_choice cannot be served; the message says why."""


# ---------------------------------------------------------------------------
# The text scanner shared by whole and streamed rewriting

# Scanner states.
_TEXT = 0  # plain text, looking for the open tag
_OPEN = 1  # after the open tag: expect "[" or "{"
_LIST = 2  # inside the list: expect "{" (or "]" before the first call)
_OBJ = 3  # inside a call object
_NEXT = 4  # after a call in the list: expect "," or "]"
_CLOSE = 5  # payload complete: expect the close tag

_WS = frozenset(" \t\r\n")
# Characters JSON allows outside strings, other than brackets and quotes.
_BARE = frozenset(" \t\r\n,:0123456789+-.eEtruefalsn")

# Scanner output: ("text", str) or ("call", index, id, name, arguments).
Op = tuple[Any, ...]


class _Scanner:
    """Incremental tool-call scanner over the text of one choice."""

    def __init__(self, fmt: ToolCallFormat, request_id: str) -> None:
        self._fmt = fmt
        self._tag = fmt.open_tag
        self._close = fmt.close_tag or ""
        self._rid = request_id
        self.state = _TEXT
        self.hold = ""  # _TEXT: a tail that may begin the open tag
        self._raw: list[str] = []  # block text since the tag or the last call
        self._obj_start = 0  # index in _raw where the current object began
        self._stack: list[str] = []
        self._in_str = False
        self._esc = False
        self._in_list = False
        self._matched = 0  # characters of the close tag seen
        self.calls = 0

    @property
    def idle(self) -> bool:
        """No text held and no call made: output equals input so far."""
        return self.state == _TEXT and not self.hold and not self.calls

    def feed(self, text: str) -> list[Op]:
        out: list[Op] = []
        i = 0
        n = len(text)
        while i < n:
            if self.state == _TEXT:
                text = self.hold + text[i:]
                self.hold = ""
                at = text.find(self._tag)
                if at < 0:
                    keep = self._partial_tag(text)
                    if keep:
                        self.hold = text[-keep:]
                        text = text[:-keep]
                    if text:
                        out.append(("text", text))
                    return out
                if at:
                    out.append(("text", text[:at]))
                self._enter_block()
                i = at + len(self._tag)
                n = len(text)
                continue
            ch = text[i]
            try:
                self._step(ch, out)
            except RewriteError as exc:
                self._malformed(str(exc), out)
                continue  # the character is read again as plain text
            i += 1
        return out

    def finish(self) -> list[Op]:
        """The generation ended: flush what is held."""
        out: list[Op] = []
        if self.state == _TEXT:
            if self.hold:
                out.append(("text", self.hold))
                self.hold = ""
        elif self.state == _CLOSE:
            # Every call in the block is out; only (part of) the close tag is
            # missing. Keep the calls; the rest is syntax, not text.
            log.info("tool call block not closed at the end (request %s)", self._rid)
            self._raw.clear()
            self.state = _TEXT
        else:
            self._malformed("the tool call block is not complete at the end", out)
        return out

    def _partial_tag(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of the tag."""
        tag = self._tag
        first = tag[0]
        start = max(0, len(text) - len(tag) + 1)
        at = text.find(first, start)
        while at >= 0:
            if tag.startswith(text[at:]):
                return len(text) - at
            at = text.find(first, at + 1)
        return 0

    def _enter_block(self) -> None:
        self.state = _OPEN
        self._raw = [self._tag]
        self._matched = 0

    def _malformed(self, why: str, out: list[Op]) -> None:
        log.warning(
            "tool call text is malformed (%s); passing it on as content (request %s)",
            why,
            self._rid,
        )
        raw = "".join(self._raw)
        self._raw.clear()
        self._stack.clear()
        self.state = _TEXT
        if raw:
            out.append(("text", raw))

    def _step(self, ch: str, out: list[Op]) -> None:
        state = self.state
        if state == _OBJ:
            self._raw.append(ch)
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
            elif ch == '"':
                self._in_str = True
            elif ch == "{" or ch == "[":
                self._stack.append("}" if ch == "{" else "]")
            elif ch == "}" or ch == "]":
                if self._stack.pop() != ch:
                    self._raw.pop()
                    raise RewriteError("brackets do not match")
                if not self._stack:
                    self._raw.pop()  # kept out until the object proves valid
                    self._end_object(ch, out)
            elif ch not in _BARE:
                self._raw.pop()
                raise RewriteError(f"unexpected {ch!r} in a call object")
            return
        if ch in _WS and state != _CLOSE:
            self._raw.append(ch)
            return
        if state == _OPEN:
            if ch == "[" and self._fmt.accepts_list:
                self._raw.append(ch)
                self._in_list = True
                self.state = _LIST
                return
            if ch == "{":
                self._in_list = False
                self._begin_object(ch)
                return
            raise RewriteError("the block does not start with a call")
        if state == _LIST:
            if ch == "{":
                self._begin_object(ch)
                return
            raise RewriteError("expected a call object in the list")
        if state == _NEXT:
            if ch == ",":
                self._raw.append(ch)
                self.state = _LIST
                return
            if ch == "]":
                self._raw.clear()
                self._end_payload()
                return
            raise RewriteError("expected ',' or ']' after a call")
        # _CLOSE
        close = self._close
        if ch == close[self._matched]:
            self._raw.append(ch)
            self._matched += 1
            if self._matched == len(close):
                self._raw.clear()
                self.state = _TEXT
            return
        if ch in _WS and not self._matched:
            self._raw.append(ch)
            return
        raise RewriteError("expected the closing tag")

    def _begin_object(self, ch: str) -> None:
        self._obj_start = len(self._raw)
        self._raw.append(ch)
        self._stack = ["}"]
        self._in_str = False
        self._esc = False
        self.state = _OBJ

    def _end_object(self, last: str, out: list[Op]) -> None:
        text = "".join(self._raw[self._obj_start :]) + last
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise RewriteError(f"a call is not valid JSON: {exc}") from exc
        name, args = self._fmt.parse_call(obj)
        out.append(("call", self.calls, _new_call_id(), name, args))
        self.calls += 1
        self._raw.clear()
        if self._in_list:
            self.state = _NEXT
        else:
            self._end_payload()

    def _end_payload(self) -> None:
        self.state = _CLOSE if self._close else _TEXT
        self._matched = 0


def _scan_all(fmt: ToolCallFormat, text: str, request_id: str) -> list[Op]:
    scanner = _Scanner(fmt, request_id)
    return scanner.feed(text) + scanner.finish()


# ---------------------------------------------------------------------------
# Whole responses


def rewrite_body(body: bytes, fmt: ToolCallFormat, request_id: str = "-") -> tuple[bytes, int]:
    """Rewrite a whole chat.completion body; return (body, tool calls made).

    Bodies with nothing to rewrite, or not shaped as expected, come back as
    the same bytes.
    """
    try:
        return _rewrite_body(body, fmt, request_id)
    except Exception:  # the response must go on whatever the model wrote
        log.exception("tool call rewriting failed; body passed on (request %s)", request_id)
        return body, 0


def _rewrite_body(body: bytes, fmt: ToolCallFormat, request_id: str) -> tuple[bytes, int]:
    # The tag's letters are never escaped in JSON: a cheap test before parsing.
    if fmt.open_tag[1:-1].encode() not in body:
        return body, 0
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body, 0
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
        return body, 0
    total = 0
    for choice in obj["choices"]:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if not isinstance(message, dict) or message.get("tool_calls"):
            continue
        content = message.get("content")
        if not isinstance(content, str) or fmt.open_tag not in content:
            continue
        ops = _scan_all(fmt, content, request_id)
        calls = [
            {"id": op[2], "type": "function", "function": {"name": op[3], "arguments": op[4]}}
            for op in ops
            if op[0] == "call"
        ]
        if not calls:
            continue
        text = "".join(op[1] for op in ops if op[0] == "text")
        message["content"] = text if text.strip() else None
        message["tool_calls"] = calls
        if "finish_reason" in choice:
            choice["finish_reason"] = "tool_calls"
        total += len(calls)
    if not total:
        return body, 0
    return _dumps_compact(obj), total


# ---------------------------------------------------------------------------
# Streams


class StreamRewriter:
    """Rewrite an engine's chat.completion.chunk SSE stream, sans I/O.

    ``feed`` the upstream body bytes in any split and send what it returns;
    call ``end`` once the upstream body is finished and send that too. Each
    choice (``n`` > 1) has its own scanner; a chunk is rewritten for its
    first choice with a delta, as vLLM sends one choice a chunk.
    """

    def __init__(self, fmt: ToolCallFormat, request_id: str = "-") -> None:
        self._fmt = fmt
        self._rid = request_id
        self._decoder = SSEDecoder()
        self._scanners: dict[int, _Scanner] = {}  # by choice index
        self._ended: set[int] = set()  # choices that had their finish_reason
        # Byte strings whose presence in an event may mean the open tag: its
        # first character, raw or as a JSON \\u escape (the escape's first five
        # characters cover both hex cases in one test).
        code = f"{ord(fmt.open_tag[0]):04x}"
        self._triggers = (fmt.open_tag[0].encode(), f"\\u{code[:3]}".encode())
        self._template: dict[str, Any] = {}
        self._eol = b"\n"
        self._finished = False  # every choice flushed: [DONE] or the end
        self.tool_calls = 0

    @property
    def _idle(self) -> bool:
        """Output equals input so far, in every choice."""
        return all(sc.idle for sc in self._scanners.values())

    def plain_triggers(self) -> tuple[bytes, bytes] | None:
        """Where `feed` would now pass whole events in the common shape
        unchanged when they hold none of these byte strings: holding
        nothing, in no tool call. None otherwise. (The C relay thread
        passes such events itself; see shim/_relay.c.)"""
        return self._triggers if self._idle and self._decoder.empty else None

    def feed(self, data: bytes) -> bytes:
        """Upstream bytes in; bytes to send to the client now out (maybe b"")."""
        idle = self._idle
        if idle:
            # The common case: whole events in which no tag can start. They
            # pass unchanged, without being split and joined again.
            first, escaped = self._triggers
            if first not in data and escaped not in data and self._decoder.whole(data):
                return data
        try:
            events = self._decoder.feed(data)
        except Exception:  # pragma: no cover - the decoder only slices bytes
            log.exception("SSE splitting failed (request %s)", self._rid)
            return data
        if not events:
            return b""
        if idle:
            # The plain path: no tag can start in these events, pass them on.
            joined = b"".join(events)
            first, escaped = self._triggers
            if first not in joined and escaped not in joined:
                return joined
        return b"".join(self._event_safe(e) for e in events)

    def end(self) -> bytes:
        """The upstream body is finished: everything still held."""
        out = b""
        rest = self._decoder.end()
        if rest:
            out = self._event_safe(rest)
        if not self._finished:
            out += self._flush_safe()
        return out

    # -- internals --

    def _event_safe(self, event: bytes) -> bytes:
        if self._idle:
            first, escaped = self._triggers
            if first not in event and escaped not in event:
                return event
        try:
            return self._event(event)
        except Exception:
            log.exception("tool call rewriting failed; event passed on (request %s)", self._rid)
            return event

    def _flush_safe(self) -> bytes:
        try:
            return self._flush()
        except Exception:  # pragma: no cover - defensive
            log.exception("tool call rewriting failed at the end (request %s)", self._rid)
            return b""

    def _flush(self) -> bytes:
        """End of the generation: send what the choices without a
        finish_reason still hold."""
        self._finished = True
        out = b""
        for index in sorted(self._scanners.keys() - self._ended):
            text = "".join(op[1] for op in self._scanners[index].finish() if op[0] == "text")
            if text:
                chunk = dict(self._template)
                chunk["choices"] = [{"index": index, "delta": {"content": text}, "finish_reason": None}]
                out += self._encode([], chunk)
        return out

    def _encode(self, others: list[bytes], chunk: dict[str, Any]) -> bytes:
        eol = self._eol
        return b"".join(line + eol for line in others) + b"data: " + _dumps_compact(chunk) + eol + eol

    def _event(self, event: bytes) -> bytes:
        eol = b"\r\n" if b"\r\n" in event else b"\n"
        data: list[bytes] = []
        others: list[bytes] = []
        for line in event.splitlines():
            if line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            elif line:
                others.append(line)
        if not data:
            return event
        payload = b"\n".join(data)
        if payload.strip() == b"[DONE]":
            if self._finished:
                return event
            self._eol = eol
            return self._flush() + event
        try:
            chunk = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return event
        if not isinstance(chunk, dict):
            return event
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return event
        pos = next(
            (k for k, c in enumerate(choices) if isinstance(c, dict) and isinstance(c.get("delta"), dict)), -1
        )
        if pos < 0:
            return event
        choice: dict[str, Any] = choices[pos]
        index = choice.get("index", 0)
        if type(index) is not int or index < 0 or index in self._ended:
            return event
        delta: dict[str, Any] = choice["delta"]
        if delta.get("tool_calls"):
            return event
        content = delta.get("content")
        if not isinstance(content, str):
            content = ""
        finish = choice.get("finish_reason")
        self._eol = eol
        self._template = {k: v for k, v in chunk.items() if k in ("id", "object", "created", "model")}
        scanner = self._scanners.get(index)
        if scanner is None:
            scanner = self._scanners[index] = _Scanner(self._fmt, self._rid)
        ops = scanner.feed(content) if content else []
        if finish is not None:
            ops += scanner.finish()
            self._ended.add(index)
            if scanner.calls:
                finish = "tool_calls"
        if finish == choice.get("finish_reason") and all(op[0] == "text" for op in ops):
            if "".join(op[1] for op in ops) == content:
                return event
        deltas: list[dict[str, Any]] = []
        for op in ops:
            if op[0] == "text":
                if deltas and set(deltas[-1]) == {"content"}:
                    deltas[-1]["content"] += op[1]
                else:
                    deltas.append({"content": op[1]})
            else:
                _, index, call_id, name, args = op
                fn_start = {"name": name, "arguments": ""}
                deltas.append(
                    {
                        "tool_calls": [
                            {"index": index, "id": call_id, "type": "function", "function": fn_start}
                        ]
                    }
                )
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": args}}]})
                self.tool_calls += 1
        extras = {k: v for k, v in delta.items() if k != "content"}
        alone = len(choices) == 1 and chunk.get("usage") is None
        if not deltas:
            if finish is None and not extras and alone:
                return b"".join(line + eol for line in others)
            deltas = [{}]
        deltas[0] = {**extras, **deltas[0]}
        out: list[bytes] = []
        last = len(deltas) - 1
        for k, d in enumerate(deltas):
            new_choice = {key: v for key, v in choice.items()}
            new_choice["delta"] = d
            if k != last:
                new_choice["finish_reason"] = None
            elif "finish_reason" in choice or finish is not None:
                new_choice["finish_reason"] = finish
            if k and "logprobs" in new_choice:
                new_choice["logprobs"] = None
            new_chunk = {key: v for key, v in chunk.items()}
            if k == 0:
                new_chunk["choices"] = [new_choice if j == pos else c for j, c in enumerate(choices)]
            else:
                new_chunk["choices"] = [new_choice]
            if k != last and "usage" in new_chunk:
                del new_chunk["usage"]
            out.append(self._encode(others if k == 0 else [], new_chunk))
        return b"".join(out)
