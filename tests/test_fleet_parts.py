"""The pure parts of several engines: STATUS per engine, merged /metrics,
and GPU holds as files."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim import yielding
from shim.metrics import merge_expositions
from shim.status import ShimStatus, format_statuses, parse_status, parse_statuses


def test_status_text_carries_every_engine_and_parses_back() -> None:
    a = ShimStatus("ready", 2, None, "vllm-a.service")
    b = ShimStatus("sleeping", 0, 1_800_000_000.5, "vllm-b.service")
    text = format_statuses([a, b], 1_800_000_010.0)
    assert parse_statuses(text) == {"vllm-a.service": a, "vllm-b.service": b}
    # one engine: the text is what it always was, and the old parser reads it
    assert format_statuses([b], 1_800_000_010.0) == b.format(1_800_000_010.0)
    assert parse_status(format_statuses([b], 0.0)) == b
    assert parse_statuses("") == {} and parse_statuses("junk; more junk") == {}


def test_engines_metrics_merge_into_one_valid_exposition() -> None:
    a = (b"# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n"
         b'vllm:num_requests_running{model_name="alpha"} 1.0\n'
         b"# HELP vllm:tokens Tokens.\n# TYPE vllm:tokens counter\n"
         b'vllm:tokens_total{model_name="alpha"} 5.0\n')
    b = (b"# HELP vllm:tokens Tokens.\n# TYPE vllm:tokens counter\n"
         b'vllm:tokens_total{model_name="beta"} 7.0\n'
         b"# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n"
         b'vllm:num_requests_running{model_name="beta"} 0.0\n')
    lines = merge_expositions([a, b]).decode().splitlines()
    assert lines == [
        "# HELP vllm:num_requests_running Running.",
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{model_name="alpha"} 1.0',
        'vllm:num_requests_running{model_name="beta"} 0.0',
        "# HELP vllm:tokens Tokens.",
        "# TYPE vllm:tokens counter",
        'vllm:tokens_total{model_name="alpha"} 5.0',
        'vllm:tokens_total{model_name="beta"} 7.0',
    ]


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path


def test_holds_are_files_per_holder(runtime: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert yielding.read_holds() == {}
    folder = yielding.holds_dir()
    folder.mkdir(parents=True)
    (folder / "whisper.service").write_text("1\n")
    (folder / "game").write_text("1\n")
    (folder / "bad name").write_text("1\n")  # not a holder name: ignored
    assert set(yielding.read_holds()) == {"whisper.service", "game"}
    # without a shim, release just removes the file (no control socket answers)
    assert yielding.release("game") == 0
    assert set(yielding.read_holds()) == {"whisper.service"}
    assert "still held by whisper.service" in capsys.readouterr().out
    assert yielding.release(None) == 0 and yielding.read_holds() == {}


def test_a_bad_holder_name_is_refused(runtime: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert yielding.release("../etc") == 2
    assert "--by '../etc'" in capsys.readouterr().err
