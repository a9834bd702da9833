"""scripts/install and scripts/uninstall as a newcomer runs them: a real venv,
units with the right paths, a default configuration, and a clean removal."""

from __future__ import annotations

import pytest

from tests.fakevllm_util import free_port
from tests.gatewaying import REPO
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox


def test_install_now_then_uninstall(sandbox: Sandbox) -> None:
    home = sandbox.env["HOME"]
    venv = f"{home}/.local/share/vllm-gateway/venv"
    # the sandbox shares the host's network: keep off a real gateway's port 8000
    port = free_port()
    sandbox.write_file(f"{home}/.config/systemd/user/vllm-gateway.socket.d/port.conf",
                       f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    out = sandbox.run([str(REPO / "scripts" / "install"), "--now"], timeout=600).stdout
    assert f"listening on 127.0.0.1:{port}" in out
    unit = sandbox.run(["cat", f"{home}/.config/systemd/user/vllm-gateway.service"]).stdout
    assert f"ExecStart={venv}/bin/vllm-gateway serve" in unit
    assert sandbox.systemctl("is-active", "vllm-gateway.socket").stdout.strip() == "active"
    assert sandbox.systemctl("is-enabled", "vllm-gateway-idle.timer").stdout.strip() == "enabled"
    check = sandbox.run([f"{home}/.local/bin/vllm-gateway", "config", "check"]).stdout
    assert "[engines.main]" in check
    # a second run upgrades in place and keeps the configuration
    sandbox.run(["sh", "-c", f"echo '# mine' >> {home}/.config/vllm-gateway/config.toml"])
    sandbox.run([str(REPO / "scripts" / "install"), "--now"], timeout=600)
    assert "# mine" in sandbox.run(["cat", f"{home}/.config/vllm-gateway/config.toml"]).stdout

    sandbox.run([str(REPO / "scripts" / "uninstall")])
    assert sandbox.run(["test", "-e", f"{home}/.config/systemd/user/vllm-gateway.socket"],
                       check=False).returncode == 1
    assert sandbox.run(["test", "-e", venv], check=False).returncode == 1
    assert sandbox.run(["test", "-L", f"{home}/.local/bin/vllm-gateway"], check=False).returncode == 1
    assert sandbox.run(["test", "-e", f"{home}/.config/vllm-gateway/config.toml"]).returncode == 0
    state = sandbox.systemctl("is-active", "vllm-gateway.socket", check=False).stdout.strip()
    assert state == "inactive"
