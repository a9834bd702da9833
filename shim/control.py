"""The local control channel: a Unix socket in the user's runtime folder,
reachable only by the user (0700), for the idle check and the command line.
Ordinary clients of the public port cannot reach it."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from .upstream import call

# A sleep can take minutes the first time (vLLM offloads all weights).
CONTROL_TIMEOUT_S = 300.0


def socket_path() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return Path(runtime) / "vllm-gateway" / "control.sock"


async def listener() -> trio.SocketListener:
    path = socket_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    path.unlink(missing_ok=True)  # a stale socket of an earlier shim
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(16)
    return trio.SocketListener(sock)


async def request(
    method: str, path: str, timeout_s: float = CONTROL_TIMEOUT_S
) -> tuple[int, bytes] | None:
    """Ask the running shim; None when no shim listens."""
    return await call("localhost", 0, method, path, None, timeout_s, unix_path=str(socket_path()))
