"""The shim's STATUS text: one format, parsed back by the idle check."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.status import ShimStatus, parse_status

token = st.text(
    alphabet=st.characters(blacklist_categories=("Z", "C"), blacklist_characters="="),
    min_size=1, max_size=20,
)
statuses = st.builds(
    ShimStatus,
    state=token,
    in_flight=st.integers(min_value=0, max_value=10**6),
    idle_since=st.none() | st.integers(min_value=0, max_value=4 * 10**12).map(lambda ms: ms / 1000),
    unit=token,
    can_sleep=st.booleans(),
)


def test_example_format() -> None:
    st_ = ShimStatus(state="ready", in_flight=0, idle_since=1795000000.123, unit="vllm.service")
    assert st_.format(now=1795000042.5) == (
        "state=ready in_flight=0 idle_since=1795000000.123 idle_s=42 unit=vllm.service"
    )


def test_in_flight_shows_dash_and_zero_idle() -> None:
    busy = ShimStatus(state="starting", in_flight=3, idle_since=None, unit="vllm.service")
    text = busy.format(now=1e9)
    assert "idle_since=- " in text
    assert "idle_s=0 " in text
    assert busy.idle_s(now=1e9) == 0.0
    assert parse_status(text) == busy


def test_idle_s_never_negative() -> None:
    ahead = ShimStatus(state="ready", in_flight=0, idle_since=100.0, unit="u.service")
    assert ahead.idle_s(now=50.0) == 0.0
    assert "idle_s=0 " in ahead.format(now=50.0)
    assert ahead.idle_s(now=160.5) == 60.5


@given(statuses, st.floats(min_value=0, max_value=5e9))
def test_round_trip(status: ShimStatus, now: float) -> None:
    assert parse_status(status.format(now)) == status


@given(statuses, st.floats(min_value=0, max_value=5e9))
def test_parsed_idle_s_matches(status: ShimStatus, now: float) -> None:
    parsed = parse_status(status.format(now))
    assert parsed is not None
    assert parsed.idle_s(now) == status.idle_s(now)


def test_field_order_does_not_matter() -> None:
    text = "unit=a.service idle_s=9 idle_since=10.000 in_flight=2 state=ready"
    assert parse_status(text) == ShimStatus("ready", 2, 10.0, "a.service")


@pytest.mark.parametrize(
    "junk",
    [
        "", "   ", "ready", "Starting the gateway...",
        "state=ready in_flight=0 idle_s=4 unit=u",  # no idle_since
        "state=ready in_flight=x idle_since=- unit=u",
        "state=ready in_flight=0 idle_since=yesterday unit=u",
        "state=ready in_flight=1.5 idle_since=- unit=u",
        "in_flight=0 idle_since=- unit=u",
        "state=ready in_flight=0 idle_since=-",
    ],
)
def test_junk_is_none(junk: str) -> None:
    assert parse_status(junk) is None


@given(st.text(max_size=80))
def test_any_text_parses_or_is_none(text: str) -> None:
    result = parse_status(text)
    assert result is None or isinstance(result, ShimStatus)


def test_an_engine_that_cannot_sleep_says_so_and_others_say_nothing() -> None:
    refused = ShimStatus(state="ready", in_flight=0, idle_since=10.0, unit="u.service", can_sleep=False)
    assert refused.format(now=20.0).endswith(" sleep=no")
    assert "sleep=" not in dataclasses.replace(refused, can_sleep=True).format(now=20.0)
    assert parse_status("state=ready in_flight=0 idle_since=1.0 unit=u.service") == ShimStatus(
        "ready", 0, 1.0, "u.service", can_sleep=True)
