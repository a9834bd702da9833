"""Start scripts/fake-vllm in a subprocess and talk plain HTTP to it.

Blocking helpers on purpose (http.client, sockets): the fake is tested as a
black box, the way the gateway will see it.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

FAKE_VLLM = Path(__file__).resolve().parent.parent / "scripts" / "fake-vllm"
# Generous: a loaded 2-core machine can take a second to start python.
READY_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pid_alive(pid: int) -> bool:
    """True while pid runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class FakeVllm:
    """One fake-vllm process on a free port; stdout and stderr go to files."""

    def __init__(
        self,
        args: list[str],
        workdir: Path,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.stdout_path = workdir / f"fake-{self.port}.out"
        self.stderr_path = workdir / f"fake-{self.port}.err"
        full_env = dict(os.environ)
        full_env.pop("VLLM_SERVER_DEV_MODE", None)
        full_env.update(env or {})
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(FAKE_VLLM), *args, "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=full_env,
            )

    # -- process ------------------------------------------------------------

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        pids = []
        for line in self.stdout.splitlines():
            if "Started engine process" in line:
                pids.append(int(line.rsplit("pid=", 1)[1]))
        return pids

    def wait_logged(self, text: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until the server has written `text` to its stdout (its progress log)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.stdout:
            if self.proc.poll() is not None:
                raise AssertionError(f"fake-vllm exited {self.proc.returncode} before logging {text!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"fake-vllm did not log {text!r} within {timeout_s} s")
            time.sleep(0.02)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"fake-vllm exited {self.proc.returncode}: {self.stderr}")
            try:
                status, _, _ = self.request("GET", "/health")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("fake-vllm did not become ready")

    def terminate(self, timeout_s: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    # -- HTTP ---------------------------------------------------------------

    def connect(self, timeout_s: float = HTTP_TIMEOUT_S) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        conn: http.client.HTTPConnection | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        own = conn is None
        c = conn or self.connect()
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            headers = {"content-type": "application/json"} if data is not None else {}
            c.request(method, path, body=data, headers=headers)
            resp = c.getresponse()
            payload = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
        finally:
            if own:
                c.close()

    def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, _, payload = self.request(method, path, body)
        return status, json.loads(payload) if payload else None


def sse_data(payload: bytes) -> list[str]:
    """The data fields of a complete SSE body, in order; checks the framing."""
    text = payload.decode("utf-8")
    assert text.endswith("\n\n"), text[-50:]
    events = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        assert all(line.startswith("data: ") for line in lines), block
        events.append("\n".join(line[len("data: ") :] for line in lines))
    return events


def stream_chunks(resp: http.client.HTTPResponse) -> Iterator[bytes]:
    """Reads a chunked body piece by piece as it arrives (for mid-stream faults)."""
    while True:
        data = resp.read1(65536)
        if not data:
            return
        yield data
