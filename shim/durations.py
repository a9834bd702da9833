"""Durations as people write them in the configuration: "90s", "10m", "1h30m"."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Return seconds. Numbers are seconds; strings join parts like "1h30m".

    Raises ValueError with a message that can follow a key name.
    """
    if isinstance(value, bool):
        raise ValueError("must be a duration like \"90s\" or \"10m\", not a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"must be a duration like \"90s\" or \"10m\", not {type(value).__name__}")
    text = value.strip().replace(" ", "")
    pos = 0
    total = 0.0
    while pos < len(text):
        m = _PART.match(text, pos)
        if m is None:
            raise ValueError(f"{value!r} is not a duration (write it like \"90s\", \"10m\", \"1h30m\")")
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if not text:
        raise ValueError("must not be empty")
    return total


def format_duration(seconds: float) -> str:
    """The inverse, for people: 0.25 -> "250ms", 90 -> "1m30s"."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole = round(seconds)
    parts = []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts)
