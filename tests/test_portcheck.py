"""shim/portcheck.py: who listens on the engine's port, read from /proc."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from shim.portcheck import listening_inodes, strangers

# the columns after the inode, as the kernel writes them (ignored)
_TAIL = " 1 0 100 0 0 10 0"
_HEAD = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"

# /proc/net/tcp as the kernel writes it: 127.0.0.1:8100 and 0.0.0.0:8101
# listening, 127.0.0.2:8102 listening (not reached by 127.0.0.1), and a
# connection from port 8100 (not a listener)
TCP = _HEAD + "".join(f"   {i}: {local} {remote} {st} 00000000:00000000 00:00000000 00000000  1000  0 {inode}"
                      f"{_TAIL}\n" for i, (local, remote, st, inode) in enumerate([
    ("0100007F:1FA4", "00000000:0000", "0A", 111),
    ("00000000:1FA5", "00000000:0000", "0A", 222),
    ("0200007F:1FA6", "00000000:0000", "0A", 333),
    ("0100007F:1FA4", "0100007F:D431", "01", 444),
]))
TCP6 = _HEAD + "".join(f"   {i}: {local}:1FA4 {'0' * 32}:0000 0A 00000000:00000000 00:00000000 00000000"
                       f"  1000  0 {inode}{_TAIL}\n" for i, (local, inode) in enumerate([
    ("0" * 32, 555),
    ("0" * 24 + "01000000", 666),
]))


def test_listeners_reached_at_loopback() -> None:
    assert listening_inodes(TCP, 8100) == {111}
    assert listening_inodes(TCP, 8101) == {222}
    assert listening_inodes(TCP, 8102) == set()  # 127.0.0.2 is not where the gateway connects
    assert listening_inodes(TCP6, 8100) == {555}  # [::] takes IPv4 too; [::1] does not


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_stranger_is_named_with_its_pid(listener: int) -> None:
    who = strangers(listener, unit_pids=set())
    assert who is not None and f"pid {os.getpid()} (" in who and "python" in who


def test_the_units_own_listener_is_no_stranger(listener: int) -> None:
    assert strangers(listener, unit_pids={os.getpid()}) is None


def test_a_free_port_has_no_stranger() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: nobody answers there
        assert strangers(s.getsockname()[1], unit_pids=set()) is None
