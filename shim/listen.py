"""The listening socket: from systemd (socket activation) or opened by hand."""

from __future__ import annotations

import os
import socket

import trio

SD_LISTEN_FDS_START = 3
# The kernel caps it anyway; a cold start can gather many waiting clients.
BACKLOG = 1024


def activated_sockets() -> list[socket.socket]:
    """Sockets passed by systemd, checked against LISTEN_PID as sd_listen_fds does."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)]


async def listeners(host: str, port: int) -> list[trio.SocketListener]:
    socks = activated_sockets()
    if socks:
        return [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]
    # An ASCII host goes as bytes: as text, the lookup encodes it with the
    # "idna" codec, whose import (stringprep's tables, ~0.1 MB) the process
    # would keep for nothing; an address or a plain name needs no IDNA.
    return await trio.open_tcp_listeners(port, host=host.encode() if host.isascii() else host,
                                         backlog=BACKLOG)
