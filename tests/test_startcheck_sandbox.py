"""A start that fails because the engine's command cannot run says why, in
the 503 and in the journal, instead of 'its process exited'."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gatewaying import Gateway
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    yield Gateway(sandbox)


def failure(gw: Gateway) -> str:
    code, headers, body = gw.chat()
    assert code == 503, body
    assert int(headers["retry-after"]) >= 1
    message: str = json.loads(body)["error"]["message"]
    return message


def test_vllm_not_installed_is_named(gw: Gateway, tmp_path: Path) -> None:
    # an empty PATH for the engine: no vllm anywhere on it
    gw.configure_command(["vllm", "serve", "Qwen/Qwen3-0.6B"], environment={"PATH": str(tmp_path)})
    message = failure(gw)
    assert "the engine's command 'vllm' was not found" in message, message
    assert "install vLLM, or set engines.main.command" in message
    assert "was not found" in gw.journal("vllm-gateway")
    assert gw.status()["state"] == "failed"


def test_a_command_that_cannot_be_executed_is_named(gw: Gateway, tmp_path: Path) -> None:
    exe = tmp_path / "vllm"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o644)
    gw.configure_command([str(exe), "serve", "m"])
    assert "permission denied" in failure(gw)


def test_a_missing_model_folder_is_named(gw: Gateway, tmp_path: Path) -> None:
    exe = tmp_path / "vllm"
    exe.write_text("#!/bin/sh\nexit 1\n")
    exe.chmod(0o755)
    gw.configure_command([str(exe), "serve", str(tmp_path / "no-such-model")])
    assert f"the model folder '{tmp_path / 'no-such-model'}' does not exist" in failure(gw)


def test_a_bad_interpreter_is_read_from_the_exit_status(gw: Gateway, tmp_path: Path) -> None:
    exe = tmp_path / "engine"
    exe.write_text("#!/nonexistent/python\n")
    exe.chmod(0o755)
    gw.configure_command([str(exe)])
    assert "203/EXEC" in failure(gw), gw.journal("vllm-gateway")[-3000:]
