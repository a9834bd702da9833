"""Read an engine's recent output back from the journal, to quote it in errors."""

from __future__ import annotations

import logging

import trio

log = logging.getLogger("vllm_gateway.journal")

# Enough of vLLM's output to show the exception and its message.
EXCERPT_LINES = 12
JOURNALCTL_TIMEOUT_S = 5.0


async def tail(unit: str, since_epoch_s: float, lines: int = EXCERPT_LINES) -> list[str]:
    """The unit's last output lines since a time; [] when the journal has none.

    A user manager's units are filed under _SYSTEMD_USER_UNIT; where the user
    manager runs at the root of its own cgroup namespace (containers, the test
    sandbox) journald files them as system units instead, so try both.
    """
    for scope in (["--user"], []):
        found = await _tail([*scope, "--unit", unit], since_epoch_s, lines)
        if found:
            return found
    return []


async def _tail(selector: list[str], since_epoch_s: float, lines: int) -> list[str]:
    cmd = [
        "journalctl", *selector, "--since", f"@{since_epoch_s:.3f}",
        "--lines", str(lines), "--output", "cat", "--no-pager", "--quiet",
    ]
    unit = selector[-1]
    try:
        with trio.fail_after(JOURNALCTL_TIMEOUT_S):
            done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    except (OSError, trio.TooSlowError) as e:
        log.warning("cannot read the journal of %s: %s", unit, e)
        return []
    if done.returncode != 0:
        log.warning("journalctl for %s failed: %s", unit, done.stderr.decode(errors="replace").strip())
        return []
    text = done.stdout.decode(errors="replace")
    return [line for line in text.splitlines() if line.strip()]


