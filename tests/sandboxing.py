"""A long-lived private systemd user manager for end-to-end tests.

`Sandbox.start()` runs `scripts/sandbox` with a holder command that reports
ready and then waits on its stdin; commands are run inside by entering the
sandbox's namespaces with nsenter. Its XDG_RUNTIME_DIR lies under /tmp, so
the session bus socket is reachable from the test process too (for jeepney).
Closing stdin ends the holder, and with it the whole sandbox.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
SANDBOX_SCRIPT = REPO / "scripts" / "sandbox"
READY = "gw-sandbox-ready"
# Starts in about half a second here; generous for a loaded CI machine.
START_TIMEOUT_S = 60.0
# Time for the holder's exit to tear everything down before we insist.
CLOSE_TIMEOUT_S = 15.0


class SandboxUnavailable(RuntimeError):
    """The sandbox could not be made on this machine (namespaces, tools, ...)."""


class SandboxCommandError(RuntimeError):
    """A command run inside the sandbox failed."""


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def children(pid: int) -> list[int]:
    """The direct children of a process (no /proc/PID/task/*/children here)."""
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and _ppid(int(p.name)) == pid]


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, found in one pass over /proc."""
    parents: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and (ppid := _ppid(int(p.name))) is not None:
            parents.setdefault(ppid, []).append(int(p.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def sandbox_cgroups(outer_pid: int) -> list[Path]:
    """The host cgroup folders that `scripts/sandbox` (PID outer_pid) makes."""
    name = f"gw-sandbox-{outer_pid}"
    root = Path("/sys/fs/cgroup")
    # v1 hierarchies may nest our own cgroup a few levels down (memory here).
    return [p for pattern in ("*", "*/*", "*/*/*", "*/*/*/*")
            for p in root.glob(f"{pattern}/{name}")] + (
        [root / name] if (root / name).exists() else [])


class Sandbox:
    """A running private systemd user manager; see the module docstring."""

    def __init__(self, proc: subprocess.Popen[str], init_pid: int, runtime_dir: str,
                 stderr_file: IO[str]) -> None:
        self._proc = proc
        self._stderr_file = stderr_file
        self.init_pid = init_pid
        self.outer_pid = proc.pid
        self.runtime_dir = runtime_dir
        self.bus_address = f"unix:path={runtime_dir}/bus"
        self.env: dict[str, str] = {
            "XDG_RUNTIME_DIR": runtime_dir,
            "DBUS_SESSION_BUS_ADDRESS": self.bus_address,
            "HOME": os.environ.get("HOME", "/root"),
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        }

    @classmethod
    def start(cls, *, keep_journal: Path | None = None,
              timeout: float = START_TIMEOUT_S) -> Sandbox:
        """Start a sandbox; raise SandboxUnavailable with the reason if it cannot."""
        opts = ["--keep-journal", str(keep_journal)] if keep_journal else []
        holder = f'echo "{READY} $XDG_RUNTIME_DIR"; exec cat >/dev/null'
        stderr_file = tempfile.TemporaryFile("w+")
        try:
            proc = subprocess.Popen(
                [str(SANDBOX_SCRIPT), *opts, "--", "sh", "-c", holder],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr_file,
                text=True, start_new_session=True)
        except OSError as e:
            stderr_file.close()
            raise SandboxUnavailable(f"cannot run {SANDBOX_SCRIPT}: {e}") from e
        try:
            runtime_dir = cls._wait_ready(proc, stderr_file, timeout)
            init_pid = cls._find_init(proc.pid)
        except BaseException:
            _stop(proc)
            stderr_file.close()
            raise
        return cls(proc, init_pid, runtime_dir, stderr_file)

    @staticmethod
    def _wait_ready(proc: subprocess.Popen[str], stderr_file: IO[str],
                    timeout: float) -> str:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while sel.select(max(0.0, deadline - time.monotonic())):
                line = proc.stdout.readline()
                if line.startswith(READY):
                    return line.split(maxsplit=1)[1].strip()
                if not line:  # it exited before being ready
                    proc.wait()
                    stderr_file.seek(0)
                    why = stderr_file.read().strip() or f"exit status {proc.returncode}"
                    raise SandboxUnavailable(why)
        raise SandboxUnavailable(f"scripts/sandbox was not ready after {timeout:.0f} s")

    @staticmethod
    def _find_init(outer_pid: int) -> int:
        # scripts/sandbox -> unshare -> PID 1 of the namespace.
        for unshare_pid in children(outer_pid):
            for pid in children(unshare_pid):
                status = Path(f"/proc/{pid}/status").read_text()
                nspids = next(line for line in status.splitlines() if line.startswith("NSpid:"))
                if nspids.split()[-1] == "1":
                    return pid
        raise SandboxUnavailable("cannot find the sandbox's PID 1 below scripts/sandbox")

    def _command(self, args: Sequence[str]) -> list[str]:
        return ["nsenter", "--target", str(self.init_pid), "--mount", "--pid", "--cgroup",
                "--", *args]

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        return {**self.env, **(env or {})}

    def run(self, args: Sequence[str], *, check: bool = True, timeout: float = 60,
            env: Mapping[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the sandbox and capture its output as text."""
        result = subprocess.run(self._command(args), env=self._env(env), input=input,
                                capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise SandboxCommandError(
                f"{list(args)} exited with {result.returncode} inside the sandbox\n"
                f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}")
        return result

    def popen(self, args: Sequence[str], *, env: Mapping[str, str] | None = None,
              **kw: Any) -> subprocess.Popen[Any]:
        """Start a command inside the sandbox in the background (Popen arguments)."""
        return subprocess.Popen(self._command(args), env=self._env(env), **kw)

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`systemctl --user ARGS` inside the sandbox."""
        return self.run(["systemctl", "--user", *args], check=check)

    def journal(self, *units: str, lines: int = 200) -> str:
        """The last journal lines of these units.

        Inside the cgroup namespace the manager's units sit at the cgroup root,
        so journald files them as system units: `-u`, not `--user -u`.
        """
        selectors_ = [arg for unit in units for arg in ("-u", unit)]
        return self.run(["journalctl", "--no-pager", "-n", str(lines), *selectors_]).stdout

    def write_file(self, path: str, text: str) -> None:
        """Write a file as seen from inside (e.g. under the private ~/.config)."""
        self.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat >"$1"', "sh", path],
                 input=text)

    def close(self, step_timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Tear the sandbox down and wait until scripts/sandbox has cleaned up
        (at most three steps of `step_timeout_s`)."""
        try:
            if self._proc.returncode is None:
                _stop(self._proc, step_timeout_s)
        finally:
            self._stderr_file.close()
            # scripts/sandbox removes it, unless it had to be killed
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop(proc: subprocess.Popen[str], step_timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """End scripts/sandbox, and with it the sandbox: bounded, whatever happens.

    Closing stdin ends the holder, the normal way out; then TERM (which
    scripts/sandbox traps and cleans up after); then KILL to its whole
    process group, and the host cgroups it made are removed here. The last
    step also runs when the wait is interrupted (Ctrl-C in pytest), so that
    an interrupted run leaves nothing behind and never hangs on the sandbox.
    """
    try:
        if proc.stdin:
            proc.stdin.close()
        for sig in (None, signal.SIGTERM):
            if sig is not None:
                proc.send_signal(sig)
            try:
                proc.wait(step_timeout_s)
                return
            except subprocess.TimeoutExpired:
                continue
    finally:
        if proc.returncode is None:
            _kill_group(proc, step_timeout_s)
        if proc.stdout:
            proc.stdout.close()


def _kill_group(proc: subprocess.Popen[str], timeout_s: float) -> None:
    """SIGKILL scripts/sandbox's process group (it runs in a session of its
    own), the namespace's PID 1 with it, then remove the cgroups it left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass  # in uninterruptible sleep: the kernel ends it; nothing else waits on it
    deadline = time.monotonic() + timeout_s
    for group in sandbox_cgroups(proc.pid):
        # the kernel reaps the namespace asynchronously: empty cgroups go once it has
        while group.exists() and time.monotonic() < deadline:
            for sub in [*sorted(group.rglob("*"), key=lambda d: len(d.parts), reverse=True), group]:
                if sub.is_dir():
                    try:
                        sub.rmdir()
                    except OSError:
                        pass
            if group.exists():
                time.sleep(0.1)
