"""scripts/install and scripts/uninstall as a newcomer runs them: a real venv
(pip included, as on a user's machine), units with the right paths, a
default configuration, journal fields, and a clean removal."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.fakevllm_util import free_port
from tests.gatewaying import REPO
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

# pip builds systemd-python from source on a loaded machine: minutes.
INSTALL_TIMEOUT_S = 900


def test_install_now_then_uninstall(sandbox: Sandbox) -> None:
    home = sandbox.env["HOME"]
    share = f"{home}/.local/share/vllm-gateway"
    venv = f"{share}/venv"
    # the sandbox shares the host's network: keep off a real gateway's port 8000
    port = free_port()
    sandbox.write_file(f"{home}/.config/systemd/user/vllm-gateway.socket.d/port.conf",
                       f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    sandbox.write_file(f"{home}/.config/systemd/user/vllm-gateway.service.d/env.conf",
                       "[Service]\nEnvironment=HF_HOME=/tmp\n")
    done = sandbox.run([str(REPO / "scripts" / "install"), "--now"], timeout=INSTALL_TIMEOUT_S)
    assert f"listening on 127.0.0.1:{port}" in done.stdout
    # what the README promises is installed: the journal fields' library...
    assert "systemd-python is not installed" not in done.stderr, done.stderr
    sandbox.run([f"{venv}/bin/python", "-c", "import systemd.journal"])
    # ...and the relay thread's C part, built by pip from the same compiler
    assert "shim/_relay.c) was not built" not in done.stderr, done.stderr
    sandbox.run([f"{venv}/bin/python", "-c", "import shim._relay"])
    # ...and the default engine's missing command is named at once
    assert "the engine's command 'vllm' was not found" in done.stderr, done.stderr
    unit = sandbox.run(["cat", f"{home}/.config/systemd/user/vllm-gateway.service"]).stdout
    assert f"ExecStart={venv}/bin/vllm-gateway serve" in unit
    assert str(REPO) not in unit  # nothing points back into the clone
    assert sandbox.systemctl("is-active", "vllm-gateway.socket").stdout.strip() == "active"
    # the idle timer is not enabled: it runs only while an engine runs
    assert sandbox.systemctl("is-enabled", "vllm-gateway-idle.timer", check=False).stdout.strip() == "static"
    assert sandbox.systemctl("is-active", "vllm-gateway-idle.timer", check=False).stdout.strip() == "inactive"
    check = sandbox.run([f"{home}/.local/bin/vllm-gateway", "config", "check"]).stdout
    assert "[engines.main]" in check
    # the service runs with -OO: its byte code is there before its first start
    compiled = sandbox.run(["sh", "-c", f"ls {venv}/lib/python3*/site-packages/shim/__pycache__/"]).stdout
    assert any(n.startswith("server.cpython-") and n.endswith(".opt-2.pyc")
               for n in compiled.split()), compiled

    # one request, found again by its id in the journal (systemd-python's fields)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", "/v1/models", headers={"X-Request-Id": "install-test-42"})
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["data"]
    conn.close()
    found = sandbox.run(["journalctl", "--no-pager", "-o", "json", "REQUEST_ID=install-test-42"]).stdout
    entries = [json.loads(line) for line in found.splitlines() if line.strip()]
    assert entries, "no journal entry has REQUEST_ID=install-test-42"
    assert entries[0]["STATUS"] == "200" and entries[0]["ROUTE"]
    # the serving process got the unit's environment: no docstrings kept
    pid = sandbox.systemctl("show", "-p", "MainPID", "--value", "vllm-gateway.service").stdout.strip()
    environ = sandbox.run(["cat", f"/proc/{pid}/environ"]).stdout.split("\0")
    assert "PYTHONOPTIMIZE=2" in environ, environ

    # a second run upgrades in place and keeps the configuration; it takes
    # back the timer's enablement that earlier versions made
    sandbox.run(["sh", "-c", f"echo '# mine' >> {home}/.config/vllm-gateway/config.toml"])
    wants = f"{home}/.config/systemd/user/timers.target.wants"
    sandbox.run(["sh", "-c", f"mkdir -p {wants} && ln -s ../vllm-gateway-idle.timer {wants}/"])
    sandbox.run([str(REPO / "scripts" / "install"), "--now"], timeout=INSTALL_TIMEOUT_S)
    assert "# mine" in sandbox.run(["cat", f"{home}/.config/vllm-gateway/config.toml"]).stdout
    assert sandbox.run(["test", "-e", f"{wants}/vllm-gateway-idle.timer"], check=False).returncode == 1

    out = sandbox.run([str(REPO / "scripts" / "uninstall")]).stdout
    assert sandbox.run(["test", "-e", f"{home}/.config/systemd/user/vllm-gateway.socket"],
                       check=False).returncode == 1
    assert sandbox.run(["test", "-e", share], check=False).returncode == 1, "an empty share folder"
    assert sandbox.run(["test", "-L", f"{home}/.local/bin/vllm-gateway"], check=False).returncode == 1
    runtime = sandbox.env["XDG_RUNTIME_DIR"]
    assert sandbox.run(["test", "-e", f"{runtime}/vllm-gateway/control.sock"], check=False).returncode == 1
    # what it keeps, it says: the configuration and both units' drop-ins
    assert sandbox.run(["test", "-e", f"{home}/.config/vllm-gateway/config.toml"]).returncode == 0
    for kept in ("vllm-gateway.socket.d", "vllm-gateway.service.d"):
        assert sandbox.run(["test", "-d", f"{home}/.config/systemd/user/{kept}"]).returncode == 0
        assert f"{home}/.config/systemd/user/{kept}" in out
    assert f"{home}/.config/vllm-gateway" in out
    state = sandbox.systemctl("is-active", "vllm-gateway.socket", check=False).stdout.strip()
    assert state == "inactive"

    out = sandbox.run([str(REPO / "scripts" / "uninstall"), "--purge"]).stdout
    assert "kept" not in out
    for gone in ("systemd/user/vllm-gateway.socket.d", "systemd/user/vllm-gateway.service.d",
                 "vllm-gateway/config.toml"):
        assert sandbox.run(["test", "-e", f"{home}/.config/{gone}"], check=False).returncode == 1
