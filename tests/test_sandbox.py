"""scripts/sandbox gives a real, private systemd user manager and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from jeepney import DBusAddress, MessageType, Properties, new_method_call
from jeepney.io.trio import DBusRouter, open_dbus_router
from jeepney.wrappers import unwrap_msg

from tests.sandboxing import (
    SANDBOX_SCRIPT,
    Sandbox,
    descendants,
    sandbox_cgroups,
)

pytestmark = pytest.mark.sandbox

SYSTEMD = DBusAddress("/org/freedesktop/systemd1", bus_name="org.freedesktop.systemd1",
                      interface="org.freedesktop.systemd1.Manager")
# Mount points that scripts/sandbox mounts over inside: none may show on the host.
PRIVATE_MOUNTS = ("/sys/fs/cgroup/", "/run/systemd", "/run/log/journal", "/var/log/journal",
                  f"{Path.home()}/.config/", f"{Path.home()}/.local/share/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


async def poll_until(predicate: Callable[[], Awaitable[bool]], what: str,
                     timeout_s: float = 10) -> None:
    # systemd offers signals for some of these, but polling keeps the test plain.
    with trio.move_on_after(timeout_s):
        while True:
            if await predicate():
                return
            await trio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def host_mounts() -> set[str]:
    """The host's mount points that scripts/sandbox would use inside."""
    points = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    return {p for p in points if p.startswith(PRIVATE_MOUNTS)}


def run_script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SANDBOX_SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_socket_unit_activates_its_service(sandbox: Sandbox) -> None:
    port = free_port()
    units = f"{sandbox.env['HOME']}/.config/systemd/user"
    sandbox.write_file(f"{units}/pong.socket", f"[Socket]\nListenStream=127.0.0.1:{port}\n")
    answer = ("import socket; s = socket.socket(fileno=3); c, _ = s.accept(); "
              "print('pong service answered', flush=True); c.sendall(b'pong'); c.close()")
    sandbox.write_file(f"{units}/pong.service",
                       f'[Service]\nExecStart={sys.executable} -c "{answer}"\n')
    sandbox.systemctl("daemon-reload")
    sandbox.systemctl("start", "pong.socket")
    assert sandbox.systemctl("is-active", "pong.service", check=False).stdout.strip() \
        == "inactive"

    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        assert conn.recv(16) == b"pong"
    # The connection started the service, and its output reached the journal.
    wait_for(lambda: "pong service answered" in sandbox.journal("pong.service"),
             "the service's output in the journal")
    sandbox.systemctl("stop", "pong.socket")
    # The unit files stayed private to the sandbox.
    assert not (Path(units) / "pong.socket").exists()


async def get_property(router: DBusRouter, path: str, interface: str, name: str) -> object:
    addr = DBusAddress(path, bus_name=SYSTEMD.bus_name, interface=interface)
    reply = unwrap_msg(await router.send_and_get_reply(Properties(addr).get(name)))
    return reply[0][1]


async def test_transient_unit_over_dbus(sandbox: Sandbox) -> None:
    name = f"gw-test-{uuid.uuid4().hex[:8]}.service"
    code = "import sys, time; print('hello from transient', flush=True); time.sleep(300)"
    properties = [
        ("Description", ("s", "sandbox test unit")),
        ("ExecStart", ("a(sasb)", [(sys.executable, [sys.executable, "-c", code], False)])),
    ]
    async with open_dbus_router(bus=sandbox.bus_address) as router:
        start = new_method_call(SYSTEMD, "StartTransientUnit", "ssa(sv)a(sa(sv))",
                                (name, "fail", properties, []))
        unwrap_msg(await router.send_and_get_reply(start))
        (path,) = unwrap_msg(await router.send_and_get_reply(
            new_method_call(SYSTEMD, "GetUnit", "s", (name,))))

        async def active() -> bool:
            state = await get_property(router, path, "org.freedesktop.systemd1.Unit",
                                       "ActiveState")
            return state == "active"

        await poll_until(active, "the transient unit to be active")
        service = "org.freedesktop.systemd1.Service"
        assert await get_property(router, path, service, "ControlGroup") == f"/app.slice/{name}"
        main_pid = await get_property(router, path, service, "MainPID")
        # Its own cgroup, as its process sees it inside.
        cgroup = sandbox.run(["cat", f"/proc/{main_pid}/cgroup"]).stdout
        assert f"name=systemd:/app.slice/{name}" in cgroup

        async def logged() -> bool:
            return "hello from transient" in sandbox.journal(name)

        await poll_until(logged, "the unit's output in the journal")

        unwrap_msg(await router.send_and_get_reply(
            new_method_call(SYSTEMD, "StopUnit", "ss", (name, "replace"))))

        async def unloaded() -> bool:
            # A stopped transient unit is unloaded: GetUnit then answers an error.
            reply = await router.send_and_get_reply(
                new_method_call(SYSTEMD, "GetUnit", "s", (name,)))
            return bool(reply.header.message_type == MessageType.error)

        await poll_until(unloaded, "the transient unit to stop and unload")


def test_script_reports_a_running_manager() -> None:
    result = run_script("--", "systemctl", "--user", "is-system-running")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in {"running", "degraded"}


def test_script_exits_with_the_commands_status() -> None:
    assert run_script("--", "false").returncode == 1
    assert run_script("--", "sh", "-c", "exit 7").returncode == 7


def test_script_usage_error() -> None:
    result = run_script("no-separator")
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_keep_journal_copies_the_journal_out(tmp_path: Path) -> None:
    # journald reads a service's output from a stream, after the unit may
    # have ended: wait inside until the line is there, then leave.
    unit_run = ["sh", "-c", "systemd-run --user --wait --unit=kept echo 'kept in the journal' && "
                "timeout 45 sh -c 'until journalctl -u kept | grep -q kept; do sleep 0.1; done'"]
    assert run_script("--keep-journal", str(tmp_path), "--", *unit_run).returncode == 0
    shown = subprocess.run(["journalctl", "--no-pager", "-D", str(tmp_path), "-u", "kept"],
                           capture_output=True, text=True, check=True)
    assert "kept in the journal" in shown.stdout


# A shell started in the background (`cmd &`, as CI runners and nohup may
# start the suite) hands its children SIGINT ignored, and a shell cannot trap
# a signal ignored on entry. Ctrl-C comes from a terminal, where SIGINT is at
# its default: start the script that way, whatever this process inherited.
DEFAULT_SIGINT = [sys.executable, "-c", "import os, signal, sys; "
                  "signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"]


# SIGTERM from a supervisor, and Ctrl-C, which reaches the whole process group.
@pytest.mark.parametrize("sig, whole_group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_signal_cleans_up(sig: signal.Signals, whole_group: bool) -> None:
    mounts_before = host_mounts()
    command = [str(SANDBOX_SCRIPT), "--", "sh", "-c", "echo up; exec sleep 300"]
    proc = subprocess.Popen([*DEFAULT_SIGINT, *command], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "up"
        inside = descendants(proc.pid)
        assert len(sandbox_cgroups(proc.pid)) >= 1
        if whole_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        assert proc.wait(120) == 128 + sig
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        proc.stdout and proc.stdout.close()
    assert_nothing_left(proc.pid, inside, mounts_before)


def test_nothing_left_after_close() -> None:
    mounts_before = host_mounts()
    sb = Sandbox.start()
    try:
        sb.run(["systemd-run", "--user", "--unit=lingering", "sleep", "300"])
        sb.systemctl("start", "lingering.service")
        inside = descendants(sb.outer_pid)
        runtime_dir = sb.runtime_dir
        assert os.path.exists(runtime_dir)
    finally:
        sb.close()
    assert_nothing_left(sb.outer_pid, inside, mounts_before)
    assert not os.path.exists(runtime_dir)


def assert_nothing_left(outer_pid: int, inside: list[int], mounts_before: set[str]) -> None:
    assert inside, "expected processes inside the sandbox"
    assert [pid for pid in inside if running(pid)] == []
    assert sandbox_cgroups(outer_pid) == []
    assert host_mounts() <= mounts_before


def test_close_is_bounded_and_complete_when_the_script_cannot_clean_up() -> None:
    # scripts/sandbox stopped (as if hung): neither stdin's end nor TERM gets
    # an answer; close still ends everything in bounded time
    mounts_before = host_mounts()
    sb = Sandbox.start()
    try:
        inside = descendants(sb.outer_pid)
        os.kill(sb.outer_pid, signal.SIGSTOP)
        t0 = time.monotonic()
    finally:
        sb.close(step_timeout_s=2)
    assert time.monotonic() - t0 < 30
    assert_nothing_left(sb.outer_pid, inside, mounts_before)


def running(pid: int) -> bool:
    """Alive, and not a zombie: a killed process whose parent died first waits,
    holding nothing, for the host's init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
