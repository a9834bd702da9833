"""Why an engine's command cannot run: found before the start, and read
from the unit's exit status after."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim import cli, startcheck


def executable(path: Path, mode: int = 0o755) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(mode)
    return path


def test_a_command_not_on_the_path_is_named_with_the_key_to_fix(tmp_path: Path) -> None:
    found = startcheck.problems("main", ["vllm", "serve", "Qwen/Qwen3-0.6B"], str(tmp_path))
    assert found == [f"the engine's command 'vllm' was not found in the PATH of the engine's unit "
                     f"({tmp_path}) (install vLLM, or set engines.main.command to its full path)"]


def test_a_command_on_the_path_passes(tmp_path: Path) -> None:
    executable(tmp_path / "vllm")
    assert startcheck.problems("main", ["vllm", "serve", "Qwen/Qwen3-0.6B"], str(tmp_path)) == []


def test_a_command_without_an_execute_bit_is_permission_denied(tmp_path: Path) -> None:
    exe = executable(tmp_path / "vllm", 0o644)
    [problem] = startcheck.problems("gpu", [str(exe), "serve", "m"], "")
    assert problem == f"the engine's command {str(exe)!r} is not executable: permission denied " \
                      "(fix engines.gpu.command)"


def test_a_folder_is_no_command(tmp_path: Path) -> None:
    assert "not executable" in startcheck.problems("main", [str(tmp_path)], "")[0]


def test_a_missing_absolute_command(tmp_path: Path) -> None:
    [problem] = startcheck.problems("main", [str(tmp_path / "venv/bin/vllm")], "")
    assert "does not exist" in problem and "engines.main.command" in problem


def test_a_missing_model_folder_is_named(tmp_path: Path) -> None:
    exe = executable(tmp_path / "vllm")
    missing = str(tmp_path / "models" / "qwen")
    assert startcheck.problems("main", [str(exe), "serve", missing], "") == [
        f"the model folder {missing!r} does not exist (fix engines.main.command)"]
    (tmp_path / "models" / "qwen").mkdir(parents=True)
    assert startcheck.problems("main", [str(exe), "serve", missing], "") == []


def test_a_hugging_face_name_is_not_a_folder(tmp_path: Path) -> None:
    exe = executable(tmp_path / "vllm")
    assert startcheck.problems("main", [str(exe), "serve", "Qwen/Qwen3-0.6B"], "") == []
    assert startcheck.problems("main", [str(exe), "serve", "--model", "./nowhere"], "") == []


def test_no_command() -> None:
    assert startcheck.problems("main", [], "/bin") == [
        "the engine 'main' has no command (set engines.main.command)"]


def test_the_units_path_is_the_engines_own_else_the_managers() -> None:
    assert startcheck.unit_path({"PATH": "/opt/bin"}, {"PATH": "/usr/bin"}) == "/opt/bin"
    assert startcheck.unit_path({}, {"PATH": "/usr/bin"}) == "/usr/bin"
    assert startcheck.unit_path({}, {}) == os.defpath


@pytest.mark.parametrize(("code", "status", "words"), [
    (1, 203, "203/EXEC"), (1, 200, "200/CHDIR"), (1, 127, "not found"), (1, 126, "permission"),
])
def test_exit_statuses_in_words(code: int, status: int, words: str) -> None:
    cause = startcheck.exit_cause(code, status)
    assert cause is not None and words in cause


def test_exit_statuses_that_say_nothing_about_the_command() -> None:
    assert startcheck.exit_cause(1, 1) is None  # the engine's own error: its journal says why
    assert startcheck.exit_cause(2, 9) is None  # killed by a signal


def test_config_check_warns_when_the_command_is_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text('[engines.main]\ncommand = ["vllm-not-installed-here", "serve", "m"]\n')
    assert cli.main(["--config", str(conf), "config", "check"]) == 0
    err = capsys.readouterr().err
    assert "warning: the engine's command 'vllm-not-installed-here' was not found" in err
