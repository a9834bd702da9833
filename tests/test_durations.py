"""Durations as people write them: parsing, formatting, and their round trip."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0), ("1d", 86400.0), ("250ms", 0.25),
        ("1h30m", 5400.0), ("1h 30m", 5400.0), ("  2m  ", 120.0), ("1.5s", 1.5),
        ("0s", 0.0), ("1m1m", 120.0), ("1d2h3m4s5ms", 93784.005),
    ],
)
def test_parse_strings(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("value", "seconds"), [(0, 0.0), (45, 45.0), (2.5, 2.5)])
def test_parse_numbers_are_seconds(value: float, seconds: float) -> None:
    result = parse_duration(value)
    assert result == seconds
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "junk",
    ["", "   ", "90", "s", "10x", "ten minutes", "1h30", "-5s", "+5s", "5 s x", "1.s", ".5s",
     "5S", "1e3s", "off", "1h-30m", "5s\x00"],
)
def test_rejects_junk_strings(junk: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(junk)


@pytest.mark.parametrize("negative", [-1, -0.5])
def test_rejects_negative_numbers(negative: float) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(negative)


@pytest.mark.parametrize("flag", [True, False])
def test_rejects_booleans(flag: bool) -> None:
    with pytest.raises(ValueError, match="not a boolean"):
        parse_duration(flag)


@pytest.mark.parametrize("other", [None, [1], {"s": 1}, b"5s"])
def test_rejects_other_types_by_name(other: object) -> None:
    with pytest.raises(ValueError, match=type(other).__name__):
        parse_duration(other)


def test_junk_message_quotes_the_value() -> None:
    with pytest.raises(ValueError, match=r"'soon' is not a duration"):
        parse_duration("soon")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0ms"), (0.25, "250ms"), (0.9994, "999ms"), (1, "1s"), (59.4, "59s"), (60, "1m"),
     (90, "1m30s"), (3600, "1h"), (3661, "1h1m1s"), (86400, "24h"), (5400.2, "1h30m")],
)
def test_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=1, max_value=10**7))
def test_round_trip_whole_seconds(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=999))
def test_round_trip_milliseconds(ms: int) -> None:
    assert parse_duration(format_duration(ms / 1000)) == pytest.approx(ms / 1000)


@given(st.floats(min_value=0, max_value=1e7, allow_nan=False))
def test_format_is_parseable_and_close(seconds: float) -> None:
    back = parse_duration(format_duration(seconds))
    # Formatting rounds to ms below a second and to whole seconds above.
    assert math.isclose(back, seconds, abs_tol=0.5 if seconds >= 1 else 0.0005) or (
        seconds < 1 and back == 1.0 and seconds >= 0.9995
    )


@given(st.one_of(st.text(max_size=12), st.integers(), st.floats(), st.booleans(), st.none()))
def test_any_input_parses_or_raises_value_error(value: object) -> None:
    try:
        result = parse_duration(value)
    except ValueError:
        return
    assert isinstance(result, float)
