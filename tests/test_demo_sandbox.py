"""scripts/install --demo from a clean state: the whole cycle a newcomer sees
without a GPU (cold start, streaming, tool calls, stop); and the demo is safe
to run twice, and to leave."""

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


def install(sb: Sandbox, *args: str) -> str:
    return sb.run([str(REPO / "scripts" / "install"), *args, "--venv", str(VENV), "--no-pip"]).stdout


def test_demo_install_shows_the_whole_cycle(sandbox: Sandbox) -> None:
    home = sandbox.env["HOME"]
    port = free_port()
    sandbox.write_file(f"{home}/.config/systemd/user/vllm-gateway.socket.d/port.conf",
                       f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    install(sandbox, "--demo", "--now")
    config = f"{home}/.config/vllm-gateway/config.toml"
    demo = sandbox.run(["cat", config]).stdout
    # the demo runs from the installation (here the test's venv), not from
    # the clone's scripts, which may move
    assert str(REPO / "scripts") not in demo
    assert f'"{VENV}/bin/python", "{home}/.local/share/vllm-gateway/fake-vllm"' in demo
    # the demo engine's default port may be taken on a shared machine
    sandbox.run(["sh", "-c", f'echo "port = {free_port()}" >> "$1"', "sh", config])
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
    engine_log = sandbox.journal("vllm.service")
    assert "Finished server process" in engine_log and "Traceback" not in engine_log  # a quiet stop


def test_the_demo_twice_keeps_the_users_configuration_and_no_demo_puts_it_back(sandbox: Sandbox) -> None:
    home = sandbox.env["HOME"]
    config = f"{home}/.config/vllm-gateway/config.toml"
    saved = f"{config}.before-demo"
    install(sandbox, "--no-demo")  # leave the first test's demo: the default comes back
    mine = "# my own configuration\n[engines.main]\ncommand = [\"vllm\", \"serve\", \"mine\"]\n"
    sandbox.write_file(config, mine)
    assert "kept as" in install(sandbox, "--demo")
    install(sandbox, "--demo")  # a second time: the saved configuration stays the user's
    assert sandbox.run(["cat", saved]).stdout == mine
    assert "[engines.demo]" in sandbox.run(["cat", config]).stdout
    assert "is back" in install(sandbox, "--no-demo")
    assert sandbox.run(["cat", config]).stdout == mine
    assert sandbox.run(["test", "-e", saved], check=False).returncode == 1
    # --no-demo on a configuration that is not the demo's changes nothing
    assert "left as it is" in install(sandbox, "--no-demo")
    assert sandbox.run(["cat", config]).stdout == mine


def test_the_demo_refuses_to_overwrite_a_saved_configuration(sandbox: Sandbox) -> None:
    home = sandbox.env["HOME"]
    config = f"{home}/.config/vllm-gateway/config.toml"
    sandbox.write_file(f"{config}.before-demo", "# saved earlier\n")
    sandbox.write_file(config, "# newer\n[engines.main]\ncommand = [\"vllm\"]\n")
    done = sandbox.run([str(REPO / "scripts" / "install"), "--demo", "--venv", str(VENV), "--no-pip"],
                       check=False)
    assert done.returncode != 0 and "already holds a saved configuration" in done.stderr
    assert sandbox.run(["cat", f"{config}.before-demo"]).stdout == "# saved earlier\n"
    assert sandbox.run(["cat", config]).stdout.startswith("# newer")
