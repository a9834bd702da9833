"""What the gateway keeps about an engine across shim restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim import learned
from shim.learned import Facts, Store, engine_key, one_line, sleep_refusal, version_in

FIXTURES = Path(__file__).parent / "fixtures"


def recorded(name: str) -> list[str]:
    return (FIXTURES / f"vllm-0.32-cpu-{name}.log").read_text().splitlines()


def test_facts_survive_a_new_store(tmp_path: Path) -> None:
    path = tmp_path / "state" / "vllm-gateway" / "learned.json"
    key = engine_key(["vllm", "serve", "m"], {})
    Store(path).put(key, Facts(sleep_refused="Sleep mode is not supported on current platform.",
                               start_s=41.5, vllm_version="0.32.0"))
    again = Store(path).get(key)
    assert again.sleep_refused == "Sleep mode is not supported on current platform."
    assert again.start_s == 41.5 and again.vllm_version == "0.32.0" and again.at > 0
    assert Store(path).get(engine_key(["vllm", "serve", "other"], {})) == Facts()


def test_the_key_follows_the_command_and_the_environment() -> None:
    base = engine_key(["vllm", "serve", "m"], {"A": "1"})
    assert base == engine_key(("vllm", "serve", "m"), {"A": "1"})
    assert base != engine_key(["vllm", "serve", "m", "--enforce-eager"], {"A": "1"})
    assert base != engine_key(["vllm", "serve", "m"], {"A": "2"})
    assert base != engine_key(["vllm", "serve m"], {"A": "1"})


def test_another_vllm_version_forgets_what_was_learned() -> None:
    facts = Facts(sleep_refused="no", start_s=40.0, vllm_version="0.32.0", at=1.0)
    assert facts.seen_version("0.32.0") is facts
    assert facts.seen_version(None) is facts
    newer = facts.seen_version("0.33.0")
    assert newer.sleep_refused is None and newer.start_s is None and newer.vllm_version == "0.33.0"
    # facts learned before the version was known (a start that failed) belong to it
    before = Facts(sleep_refused="no")
    assert before.seen_version("0.32.0") == Facts(sleep_refused="no", vllm_version="0.32.0")
    assert Facts().seen_version("0.32.0") == Facts(vllm_version="0.32.0")


@pytest.mark.parametrize("content", ["", "not json", "[1, 2]", '{"k": "x"}', '{"k": {"start_s": "soon"}}',
                                     '{"k": {"unknown": 1, "start_s": 3}}'])
def test_a_damaged_file_is_ignored_not_fatal(tmp_path: Path, content: str) -> None:
    path = tmp_path / "learned.json"
    path.write_text(content)
    facts = Store(path).get("k")
    assert facts in (Facts(), Facts(start_s=3))
    Store(path).put("k", Facts(start_s=5.0))
    assert Store(path).get("k").start_s == 5.0


def test_an_unwritable_directory_is_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    Store(blocker / "learned.json").put("k", Facts(start_s=1.0))
    assert "cannot keep" in caplog.text
    Store(None).put("k", Facts(start_s=1.0))  # keeps nothing
    assert Store(None).get("k") == Facts()


def test_old_entries_are_dropped_when_writing(tmp_path: Path) -> None:
    path = tmp_path / "learned.json"
    path.write_text(json.dumps({"old": {"start_s": 1.0, "at": 1.0}, "new": {"start_s": 2.0, "at": 9e9}}))
    Store(path).put("k", Facts())
    assert set(json.loads(path.read_text())) == {"new", "k"}


def test_the_state_directory_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert learned.state_dir() == tmp_path / "vllm-gateway"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert learned.state_dir() == tmp_path / ".local" / "state" / "vllm-gateway"


def test_the_reason_of_a_refused_sleep_mode_is_one_line() -> None:
    assert sleep_refusal(recorded("sleep-refused")) == "Sleep mode is not supported on current platform."
    assert sleep_refusal(recorded("start-eager")) is None


def test_the_version_comes_from_vllms_banner() -> None:
    assert version_in(recorded("start-eager")) == "0.32.0"
    assert version_in(["INFO 05-01 [api_server.py:1] vLLM API server version 0.8.5.post1"]) == "0.8.5.post1"
    assert version_in(["torch version 2.13.0"]) is None


def test_one_line_drops_traceback_decoration() -> None:
    text = "RuntimeError: boom\n    ^^^^^^^^\n  | ~~~~^^^ |\nsecond  line"
    assert one_line(text) == "RuntimeError: boom | second line"
    assert one_line("a | ^^^^ | b") == "a | b"
    assert len(one_line("x" * 1000)) == learned.MAX_REASON_CHARS


@given(st.text())
def test_one_line_is_one_line(text: str) -> None:
    line = one_line(text)
    assert "\n" not in line and "\r" not in line and len(line) <= learned.MAX_REASON_CHARS
