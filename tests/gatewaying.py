"""An installed vllm-gateway inside a sandbox, driven like a user would:
scripts/install, systemctl, journalctl and HTTP on the socket's port."""

from __future__ import annotations

import http.client
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tests.fakevllm_util import FAKE_VLLM, free_port
from tests.sandboxing import Sandbox

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
# Cold starts through systemd on a loaded 2-core machine: generous bounds.
HTTP_TIMEOUT_S = 60.0
CONFIG = "~/.config/vllm-gateway/config.toml"
# Admin endpoints on the public port need this key; tests use it by default.
ADMIN_KEY = "test-admin-key"
UNITS = "~/.config/systemd/user"


# The tool that tests offer to models (and that the fake engine "calls").
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, dict):  # an inline table: {KEY = "value", ...}
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):  # items may be inline tables
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


class Gateway:
    """The gateway installed in `sb`, listening on `self.port`."""

    def __init__(self, sb: Sandbox, *, timer_every_s: float | None = None) -> None:
        self.sb = sb
        self.port = free_port()
        self.engine_port = free_port()
        self.home = sb.env["HOME"]
        sb.run([str(REPO / "scripts" / "install"), "--venv", str(VENV), "--no-pip"])
        sb.write_file(
            f"{self.home}/.config/systemd/user/vllm-gateway.socket.d/test.conf",
            f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{self.port}\n",
        )
        if timer_every_s is not None:
            sb.write_file(
                f"{self.home}/.config/systemd/user/vllm-gateway-idle.timer.d/test.conf",
                f"[Timer]\nOnActiveSec={timer_every_s}s\nOnUnitActiveSec={timer_every_s}s\n",
            )
        sb.systemctl("daemon-reload")

    def configure(
        self, fake_args: list[str] | None = None, gateway: dict[str, Any] | None = None, **engine: Any
    ) -> None:
        """Write the configuration (the fake engine with `fake_args`), stop the
        shim and the engine, and (re)start the socket: the next request runs
        the new configuration."""
        command = [sys.executable, str(FAKE_VLLM), "--served-model-name", "tiny", *(fake_args or [])]
        self.configure_command(command, gateway, **engine)

    def configure_command(
        self, command: list[str], gateway: dict[str, Any] | None = None, **engine: Any
    ) -> None:
        """Like `configure`, with any engine command (e.g. real vLLM)."""
        table: dict[str, Any] = {"command": command, "port": self.engine_port, "models": ["tiny"]}
        table.update(engine)
        gateway = {"admin_key": ADMIN_KEY, **(gateway or {})}
        lines = ["[gateway]"] + [f"{k} = {toml_value(v)}" for k, v in gateway.items() if v is not None]
        lines += ["[engines.main]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
        self.sb.write_file(f"{self.home}/.config/vllm-gateway/config.toml", "\n".join(lines) + "\n")
        self.sb.systemctl("stop", "vllm-gateway.service", "vllm.service", check=False)
        self.sb.systemctl("reset-failed", check=False)
        self.sb.systemctl("enable", "--now", "vllm-gateway.socket")

    def configure_engines(
        self, engines: Mapping[str, Mapping[str, Any]], gateway: dict[str, Any] | None = None,
        *, stop_engines: bool = True,
    ) -> None:
        """Several fake engines: NAME -> {"models": [...], "fake_args": [...], KEY: value}. Each
        engine is fake-vllm serving its models; the rest of the table goes to the config."""
        gateway = {"admin_key": ADMIN_KEY, **(gateway or {})}
        lines = ["[gateway]"] + [f"{k} = {toml_value(v)}" for k, v in gateway.items() if v is not None]
        units = ["vllm-gateway.service"]
        for name, spec in engines.items():
            table = {k: v for k, v in spec.items() if k != "fake_args"}
            table["command"] = [sys.executable, str(FAKE_VLLM), "--served-model-name", *spec["models"],
                                *spec.get("fake_args", [])]
            table.setdefault("port", free_port())
            lines += [f"[engines.{name}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
            units.append(f"vllm-{name}.service")
        self.sb.write_file(f"{self.home}/.config/vllm-gateway/config.toml", "\n".join(lines) + "\n")
        if stop_engines:
            units += ["vllm-*.service", "vllm.service"]
        self.sb.systemctl("stop", *units, check=False)
        self.sb.systemctl("reset-failed", check=False)
        self.sb.systemctl("enable", "--now", "vllm-gateway.socket")

    # ---- HTTP ----

    def connect(self, timeout_s: float = HTTP_TIMEOUT_S) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)

    def request(
        self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None,
        timeout_s: float = HTTP_TIMEOUT_S,
    ) -> tuple[int, dict[str, str], bytes]:
        c = self.connect(timeout_s)
        try:
            raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            sent = {"Content-Type": "application/json"} if raw is not None else {}
            if headers is None and path.startswith("/gateway/") and method == "POST":
                sent["Authorization"] = f"Bearer {ADMIN_KEY}"
            sent.update(headers or {})  # real vLLM refuses bodies without it
            c.request(method, path, body=raw, headers=sent)
            resp = c.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            c.close()

    def chat(
        self, content: str = "hi", model: str = "tiny", **extra: Any
    ) -> tuple[int, dict[str, str], bytes]:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        return self.request("POST", "/v1/chat/completions", body)

    def status(self) -> dict[str, Any]:
        code, _, body = self.request("GET", "/gateway/status")
        assert code == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    # ---- systemd ----

    def unit_prop(self, unit: str, prop: str) -> str:
        return self.sb.systemctl("show", "-P", prop, unit).stdout.strip()

    def active(self, unit: str) -> str:
        return self.sb.systemctl("is-active", unit, check=False).stdout.strip()

    def journal(self, *units: str) -> str:
        return self.sb.journal(*units, lines=2000)

    def hold_memory(self, unit: str, slice: str, mib: int) -> None:
        """Another program in `slice` (a fake GPU) that holds `mib` MiB until
        its unit is stopped; returns once the memory is held."""
        self.sb.run(["systemd-run", "--user", f"--unit={unit}", f"--slice={slice}", "--", "python3", "-c",
                     f"import mmap, time\nm = mmap.mmap(-1, {mib} << 20)\n"
                     f"for i in range(0, {mib} << 20, 4096): m[i] = 1\ntime.sleep(600)"])
        wait_until(lambda: int(self.unit_prop(unit, "MemoryCurrent") or 0) >= (mib << 20) * 3 // 4, 30,
                   f"{unit} to hold its memory")

    def alive_in_sandbox(self, pid: int) -> bool:
        return self.sb.run(["kill", "-0", str(pid)], check=False).returncode == 0


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
