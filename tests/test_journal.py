"""Reading vLLM's own output: the start phase and the excerpt quoted in
errors, on start-ups of vLLM 0.32 (CPU build) recorded by the real-vLLM
tier (tests/fixtures/)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim import journal
from shim.journal import PHASE_NAMES, STARTING_PROCESS, excerpt, start_phase

FIXTURES = Path(__file__).parent / "fixtures"


def recorded(name: str) -> list[str]:
    return (FIXTURES / f"vllm-0.32-cpu-{name}.log").read_text().splitlines()


def phases_as_lines_arrive(lines: list[str]) -> list[str]:
    """Every phase shown while the lines come one by one, in order, each once."""
    shown = [start_phase([])]
    for i in range(1, len(lines) + 1):
        phase = start_phase(lines[:i], shown[-1])
        if phase != shown[-1]:
            shown.append(phase)
    return shown


def test_something_is_shown_before_vllm_says_anything() -> None:
    assert start_phase([]) == STARTING_PROCESS
    # the first 20 s of a start: python imports vLLM and torch
    assert start_phase(recorded("start-eager")[:5]) == STARTING_PROCESS


def test_an_eager_start_never_shows_compiling() -> None:
    lines = recorded("start-eager")
    assert any("Enforce eager set, disabling torch.compile" in line for line in lines)
    assert phases_as_lines_arrive(lines) == [
        "starting process", "initialising", "starting engine", "loading weights", "profiling memory",
        "starting API server",
    ]


def test_a_compiling_start_shows_compiling_between_weights_and_memory() -> None:
    assert phases_as_lines_arrive(recorded("start-compile")) == [
        "starting process", "initialising", "starting engine", "loading weights", "compiling",
        "profiling memory", "starting API server",
    ]


def test_the_server_line_means_starting_api_server() -> None:
    lines = recorded("start-eager")
    at = next(i for i, line in enumerate(lines) if "Starting vLLM server on http://" in line)
    assert start_phase(lines[: at + 1]) == "starting API server"
    assert start_phase(lines[:at]) == "profiling memory"


@pytest.mark.parametrize("name", ["start-eager", "start-compile"])
def test_a_window_of_later_lines_never_moves_the_phase_back(name: str) -> None:
    """The journal may give only the last lines; what was shown stays."""
    lines = recorded(name)
    shown = STARTING_PROCESS
    for i in range(len(lines)):
        phase = start_phase(lines[i: i + 5], shown)
        assert PHASE_NAMES.index(phase) >= PHASE_NAMES.index(shown)
        shown = phase
    assert shown == "starting API server"


@given(st.lists(st.text(max_size=80), max_size=20), st.sampled_from(PHASE_NAMES))
def test_any_lines_give_a_known_phase_no_earlier_than_shown(lines: list[str], shown: str) -> None:
    phase = start_phase(lines, shown)
    assert phase in PHASE_NAMES
    assert PHASE_NAMES.index(phase) >= PHASE_NAMES.index(shown)


def test_an_unknown_shown_phase_counts_as_the_first() -> None:
    assert start_phase([], "no such phase") == STARTING_PROCESS


def test_the_excerpt_of_a_refused_sleep_mode_is_the_error_and_its_reason() -> None:
    lines = recorded("sleep-refused")[-journal.TAIL_LINES:]
    assert any(set(line.strip()) == {"^"} for line in lines)
    assert excerpt(lines) == [
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
        "Value error, Sleep mode is not supported on current platform. [type=value_error, "
        "input_value=ArgsKwargs((), {'model': ...nderer_num_workers': 1}), input_type=ArgsKwargs]",
    ]


def test_the_excerpt_never_holds_traceback_decoration() -> None:
    lines = ["Traceback (most recent call last):", '  File "x.py", line 1, in f', "    f()",
             "    ^^^^^^", "    ~~~~^^^", "something odd happened"]
    out = excerpt(lines)
    assert out and not any(set(line) <= set("^~ ") for line in out)
    assert excerpt(["RuntimeError: boom", "    ^^^^"]) == ["RuntimeError: boom"]
