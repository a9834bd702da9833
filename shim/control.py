"""The local control channel: a Unix socket in the user's runtime folder,
reachable only by the user (0700), for the idle check and the command line.
Ordinary clients of the public port cannot reach it."""

from __future__ import annotations

import os
import socket
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
    # Bound at once: a path in the runtime folder (a tmpfs) does not block.
    # trio's own bind of a Unix path runs in a worker thread, which then
    # stays in the shim's memory and wakes it 10 s later to exit.
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        plain.bind(str(path))
        plain.listen(16)
    except OSError:
        plain.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(plain))


async def request(
    method: str, path: str, timeout_s: float = CONTROL_TIMEOUT_S
) -> tuple[int, bytes] | None:
    """Ask the running shim; None when no shim listens."""
    return await call("localhost", 0, method, path, None, timeout_s, unix_path=str(socket_path()))
