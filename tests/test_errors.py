"""Engine errors passed on in OpenAI's error shape."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.errors import ENGINE_MESSAGE_MAX_CHARS, engine_error_body


def shaped(status: int, body: bytes) -> Any:
    out = engine_error_body(status, body)
    assert out is not None
    return json.loads(out)["error"]


def test_openai_shaped_errors_pass_unchanged() -> None:
    # vLLM 0.32's own 400 (recorded)
    body = (b'{"error":{"message":"tool_choice=\\"required\\" requires --tool-call-parser to be set",'
            b'"type":"BadRequestError","param":null,"code":400}}')
    assert engine_error_body(400, body) is None


def test_fastapis_not_found_keeps_its_message() -> None:
    # what vLLM 0.32 answers for /v1/embeddings on a generating model (recorded)
    assert shaped(404, b'{"detail":"Not Found"}') == {
        "message": "Not Found", "type": "invalid_request_error", "param": None, "code": None}


def test_validation_errors_become_one_message() -> None:
    body = json.dumps({"detail": [
        {"type": "missing", "loc": ["body", "messages"], "msg": "Field required", "input": {}},
        {"type": "x", "loc": ["query", "n"], "msg": "bad"}]}).encode()
    assert shaped(422, body)["message"] == "body.messages: Field required; query.n: bad"
    assert shaped(422, b'{"detail": [1, {"msg": "no loc"}]}')["message"] == "1; no loc"
    assert shaped(400, b'{"detail": {"a": 1}}')["message"] == '{"a": 1}'


def test_vllms_older_error_response_keeps_its_message_and_type() -> None:
    body = (b'{"object": "error", "message": "The model `x` does not exist.", "type": "NotFoundError", '
            b'"code": 404}')
    assert shaped(404, body) == {"message": "The model `x` does not exist.", "type": "NotFoundError",
                                 "param": None, "code": None}


@pytest.mark.parametrize(("status", "body", "message", "kind"), [
    (502, b"Bad Gateway", "Bad Gateway", "server_error"),
    (500, b"", "the engine answered 500 without a message", "server_error"),
    (400, b"\xff\xfe oops", "\ufffd\ufffd oops", "invalid_request_error"),
    (503, b"[1, 2]", "[1, 2]", "server_error"),
    (500, b'{"error": "flat"}', '{"error": "flat"}', "server_error"),
])
def test_anything_else_becomes_its_text(status: int, body: bytes, message: str, kind: str) -> None:
    error = shaped(status, body)
    assert error["message"] == message and error["type"] == kind


def test_long_messages_are_clipped() -> None:
    assert len(shaped(500, b"x" * 10_000)["message"]) == ENGINE_MESSAGE_MAX_CHARS + 1


@given(st.integers(400, 599), st.binary(max_size=300))
def test_any_answer_comes_out_in_openais_shape(status: int, body: bytes) -> None:
    out = engine_error_body(status, body)
    value = json.loads(body if out is None else out)
    assert isinstance(value["error"]["message"], str)
