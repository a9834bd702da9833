"""Who listens on the engine's port: the engine unit's own processes, or a
stranger. A program that already listens there would get the health probe
and every client's request; the gateway must not start (or count as ready)
an engine whose port answers for somebody else.

Read from /proc only: LISTEN sockets in /proc/net/tcp{,6}, their owners
through /proc/PID/fd, and the unit's processes through its cgroup. Parsing
is pure; `stranger_on_port` does the reading (in a thread: it walks /proc).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .gpu import CGROUP_ROOTS, PROC, cgroup_dir, tree_pids

if TYPE_CHECKING:
    from .systemd import Systemd

log = logging.getLogger("vllm_gateway.portcheck")

_LISTEN = "0A"
# Local addresses at which a connection to 127.0.0.1 arrives: 127.0.0.1 and
# 0.0.0.0 (IPv4, as /proc writes them), :: and ::ffff:127.0.0.1 (IPv6).
_REACHED = frozenset({
    "0100007F", "00000000",
    "00000000000000000000000000000000", "0000000000000000FFFF00000100007F",
})


def listening_inodes(table: str, port: int) -> set[int]:
    """Inodes of the sockets in a /proc/net/tcp or tcp6 text that listen on
    `port` where a connection to 127.0.0.1 would reach them."""
    inodes: set[int] = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN:
            continue
        address, _, hex_port = fields[1].partition(":")
        if int(hex_port, 16) == port and address.upper() in _REACHED:
            inodes.add(int(fields[9]))
    return inodes


def socket_owners(inodes: set[int], proc: Path = PROC) -> dict[int, set[int]]:
    """inode -> the pids that hold it open (those whose fds we may read)."""
    owners: dict[int, set[int]] = {}
    links = {f"socket:[{inode}]": inode for inode in inodes}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"{entry.path}/fd")
        except OSError:  # another user's process, or gone
            continue
        with fds:
            for fd in fds:
                try:
                    inode = links.get(os.readlink(fd.path))
                except OSError:
                    continue
                if inode is not None:
                    owners.setdefault(inode, set()).add(int(entry.name))
    return owners


def describe(pid: int, proc: Path = PROC) -> str:
    """`pid 1234 (python3 -m http.server 8100)`, as far as it can be read."""
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
        command = " ".join(a.decode(errors="replace") for a in argv if a)[:200]
    except OSError:
        command = ""
    return f"pid {pid} ({command})" if command else f"pid {pid}"


def strangers(port: int, unit_pids: set[int], proc: Path = PROC) -> str | None:
    """Who else listens on the port: a description, or None when nobody does
    or only the unit's processes."""
    inodes: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            inodes |= listening_inodes((proc / "net" / name).read_text(), port)
        except OSError:
            continue
    if not inodes:
        return None
    owners = socket_owners(inodes, proc)
    others: list[int] = []
    unknown = 0
    for inode in inodes:
        pids = owners.get(inode, set())
        if not pids:
            unknown += 1
        elif not pids & unit_pids:
            others.extend(sorted(pids))
    if not others and not unknown:
        return None
    who = [describe(pid, proc) for pid in sorted(set(others))]
    if unknown:
        who.append("a program this user cannot see")
    return ", ".join(who)


def unit_pids(control_group: str, roots: Iterable[Path] = CGROUP_ROOTS) -> set[int]:
    top = cgroup_dir(control_group, tuple(roots)) if control_group else None
    return tree_pids(top) if top is not None else set()


async def port_taken(systemd: Systemd, unit: str, port: int) -> str | None:
    """Why the engine's port is not the unit's (a message naming the port and
    who holds it), or None when nobody else listens there."""
    control_group = await systemd.control_group(unit)

    def check() -> str | None:
        return strangers(port, unit_pids(control_group))

    who = await trio.to_thread.run_sync(check)
    if who is None:
        return None
    return (f"the port {port} is taken by {who}, not by the engine: stop that program, "
            "or give the engine another port")
