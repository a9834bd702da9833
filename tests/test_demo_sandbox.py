"""scripts/install --demo from a clean state: the whole cycle a newcomer sees
without a GPU (cold start, streaming, tool calls, stop)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
import pytest

from tests.fakevllm_util import free_port
from tests.gatewaying import REPO, VENV, WEATHER_TOOL
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox



def test_demo_install_shows_the_whole_cycle(sandbox: Sandbox) -> None:
    home = sandbox.env["HOME"]
    port = free_port()
    sandbox.write_file(f"{home}/.config/systemd/user/vllm-gateway.socket.d/port.conf",
                       f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    sandbox.run([str(REPO / "scripts" / "install"), "--demo", "--now", "--venv", str(VENV), "--no-pip"])
    cli = str(Path(sys.executable).parent / "vllm-gateway")
    assert "[engines.demo]" in sandbox.run([cli, "config", "check"]).stdout

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60)
    assert [m.id for m in client.models.list()] == ["demo"]  # answered without starting anything
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content  # after the demo's 8 s cold start
    status = json.loads(sandbox.run([cli, "status", "--json"]).stdout)
    assert status["state"] == "ready" and status["last_cold_start_s"] >= 7

    chunks = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    call = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Weather in Tokyo?"}], tools=[WEATHER_TOOL])
    choice = call.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Tokyo"}

    out = sandbox.run([cli, "stop"]).stdout
    assert "stopped" in out
    assert sandbox.systemctl("is-active", "vllm.service", check=False).stdout.strip() == "inactive"
