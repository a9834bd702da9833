"""Figures from the reliability tests (soak, fuzz, faults): each test prints
one summary line, whatever pytest's capture setting, and appends the same
figures as one JSON line to `reliability.jsonl` in the session's base temp
folder, so a long run leaves its numbers behind for docs/reliability.md."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest


def report_path(factory: pytest.TempPathFactory) -> Path:
    return factory.getbasetemp() / "reliability.jsonl"


def record(factory: pytest.TempPathFactory, name: str, **figures: Any) -> None:
    """Print `name: k=v ...` to the real stdout and append it as JSON."""
    line = f"reliability: {name}: " + " ".join(f"{k}={v}" for k, v in figures.items())
    # sys.__stdout__ bypasses pytest's capture, so the line shows without -s
    out = sys.__stdout__ or sys.stdout
    out.write("\n" + line + "\n")
    out.flush()
    print(line)  # also in the captured output of a failing test
    path = report_path(factory)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"t": time.time(), "test": name, **figures}) + "\n")
