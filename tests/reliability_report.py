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


def record(request: pytest.FixtureRequest, name: str, **figures: Any) -> None:
    """Print `name: k=v ...` past pytest's capture and append it as JSON."""
    line = f"reliability: {name}: " + " ".join(f"{k}={v}" for k, v in figures.items())
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():  # shows without -s
            sys.stdout.write("\n" + line + "\n")
            sys.stdout.flush()
    print(line)  # also in the captured output of a failing test
    path = report_path(request.getfixturevalue("tmp_path_factory"))
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"t": time.time(), "test": name, **figures}) + "\n")
