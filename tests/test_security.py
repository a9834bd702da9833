"""The max_tokens guardrail on request bodies, per endpoint."""

from __future__ import annotations

import json

import pytest

from shim.errors import GatewayError
from shim.routes import GENERATION
from shim.security import apply_max_tokens

CHAT = GENERATION["/v1/chat/completions"]
RESPONSES = GENERATION["/v1/responses"]


def apply(body: dict[str, object], policy: str, fields: tuple[str, ...], limit: int | None = 64) -> object:
    raw = json.dumps(body).encode()
    return json.loads(apply_max_tokens(body, raw, limit, policy, fields))


def test_without_a_limit_the_body_passes_byte_for_byte() -> None:
    raw = b'{"max_tokens": 100000,  "model": "m"}'
    assert apply_max_tokens({"max_tokens": 100000, "model": "m"}, raw, None, "reject", CHAT) is raw


def test_a_body_within_the_limit_passes_byte_for_byte() -> None:
    raw = b'{"max_tokens": 10,  "model": "m"}'
    assert apply_max_tokens({"max_tokens": 10, "model": "m"}, raw, 64, "reject", CHAT) is raw


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_chat_asking_for_more_is_refused_naming_the_field(field: str) -> None:
    with pytest.raises(GatewayError) as e:
        apply({field: 65}, "reject", CHAT)
    assert e.value.status == 400 and e.value.code == "max_tokens_too_large"
    assert f"{field}=65" in e.value.message and "limit of 64" in e.value.message


def test_responses_asking_for_more_is_refused_or_capped() -> None:
    with pytest.raises(GatewayError) as e:
        apply({"max_output_tokens": 5000}, "reject", RESPONSES)
    assert "max_output_tokens=5000" in e.value.message
    assert apply({"max_output_tokens": 5000}, "cap", RESPONSES) == {"max_output_tokens": 64}


def test_the_limit_is_set_in_the_endpoints_own_field() -> None:
    assert apply({"model": "m"}, "reject", CHAT) == {"model": "m", "max_tokens": 64}
    assert apply({"model": "m"}, "reject", RESPONSES) == {"model": "m", "max_output_tokens": 64}
    # a chat field in a Responses body bounds nothing there: the limit is still set
    assert apply({"max_tokens": 5}, "cap", RESPONSES) == {"max_tokens": 5, "max_output_tokens": 64}


def test_cap_lowers_every_field_over_the_limit() -> None:
    body = {"max_tokens": 500, "max_completion_tokens": 10}
    assert apply(body, "cap", CHAT) == {"max_tokens": 64, "max_completion_tokens": 10}


@pytest.mark.parametrize("value", ["64", 6.5, True, [1]])
def test_a_token_field_that_is_not_an_integer_is_refused(value: object) -> None:
    with pytest.raises(GatewayError) as e:
        apply({"max_output_tokens": value}, "cap", RESPONSES)
    assert e.value.status == 400 and "max_output_tokens must be an integer" in e.value.message
