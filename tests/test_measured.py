"""shim.measured: the file of measured engine memory; parsed, rendered, kept."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from shim import measured
from shim.measured import FormatError, Measured, MeasuredStore, engine_key, parse, render

GiB = 1024**3
CMD = ("vllm", "serve", "Qwen/Qwen3-8B", "--gpu-memory-utilization", "0.45")


def test_the_key_is_the_command_line_as_a_shell_shows_it() -> None:
    assert engine_key(CMD) == "vllm serve Qwen/Qwen3-8B --gpu-memory-utilization 0.45"
    assert engine_key(["a b", "c"]) == "'a b' c"
    assert engine_key(["a", "b c"]) != engine_key(["a b", "c"])


def test_figures_round_trip_through_the_file_text() -> None:
    m = Measured(awake={0: 11 * GiB, 1: 10 * GiB}, asleep={1: {0: 6 * GiB}, 2: {0: GiB}}, updated=5.25)
    text = render({engine_key(CMD): m})
    assert json.loads(text) == {"format": 1, "engines": {engine_key(CMD): {
        "awake": {"0": 11 * GiB, "1": 10 * GiB}, "asleep": {"1": {"0": 6 * GiB}, "2": {"0": GiB}},
        "updated": 5.25}}}
    assert parse(text) == {engine_key(CMD): m}
    assert parse(render({})) == {}


@pytest.mark.parametrize("text", [
    "", "[]", '{"format": 2, "engines": {}}', '{"format": 1}', '{"format": 1, "engines": []}',
    '{"format": 1, "engines": {"x": 1}}',
    '{"format": 1, "engines": {"x": {"awake": {"gpu0": 1}}}}',
    '{"format": 1, "engines": {"x": {"awake": {"0": -1}}}}',
    '{"format": 1, "engines": {"x": {"awake": {"0": true}}}}',
    '{"format": 1, "engines": {"x": {"asleep": {"one": {"0": 1}}}}}',
    '{"format": 1, "engines": {"x": {"asleep": {"1": {"0": 1.5}}}}}',
    '{"format": 1, "engines": {"x": {"updated": "now"}}}',
])
def test_anything_else_is_a_format_error(text: str) -> None:
    with pytest.raises(FormatError):
        parse(text)


def test_with_awake_and_asleep_replace_only_their_figures() -> None:
    m = Measured().with_awake({0: 5}, 1.0).with_asleep(1, {0: 2}, 2.0).with_asleep(2, {0: 1}, 3.0)
    assert m == Measured(awake={0: 5}, asleep={1: {0: 2}, 2: {0: 1}}, updated=3.0)
    assert m.with_awake({0: 6}, 4.0).asleep == m.asleep


def test_the_store_lives_in_the_state_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert measured.state_dir() == tmp_path / "state" / "vllm-gateway"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert MeasuredStore().path == tmp_path / ".local" / "state" / "vllm-gateway" / "measured.json"


def test_the_store_keeps_figures_across_runs(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "measured.json"
    store = MeasuredStore(path).load()
    assert store.get(CMD) == Measured()
    store.put(CMD, Measured(awake={0: GiB}, updated=1.0))
    assert MeasuredStore(path).load().get(CMD) == Measured(awake={0: GiB}, updated=1.0)
    assert [p.name for p in path.parent.iterdir()] == ["measured.json"]  # no temporary file left


def test_a_damaged_file_is_ignored_with_a_warning_and_replaced(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "measured.json"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        store = MeasuredStore(path).load()
    assert store.engines == {} and "ignoring" in caplog.text and "not JSON" in caplog.text
    store.put(CMD, Measured(awake={0: 1}))
    assert parse(path.read_text()) == {engine_key(CMD): Measured(awake={0: 1})}


def test_a_store_that_cannot_write_says_so_and_keeps_the_figures_in_memory(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = MeasuredStore(blocker / "measured.json")
    with caplog.at_level(logging.WARNING):
        store.put(CMD, Measured(awake={0: 1}))
    assert "cannot keep the measured memory" in caplog.text
    assert store.get(CMD).awake == {0: 1}
