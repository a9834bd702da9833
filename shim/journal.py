"""Read an engine's recent output back from the journal, to quote it in errors."""

from __future__ import annotations

import logging
import re

import trio

log = logging.getLogger("vllm_gateway.journal")

# vLLM's start-up failures end in two tracebacks (the engine core's, then the
# API server's); this many lines hold both exception lines.
TAIL_LINES = 60
EXCERPT_MAX_LINES = 6
JOURNALCTL_TIMEOUT_S = 5.0
# Journald can receive a dying process's last lines just after systemd reports
# its end: read until the tail stops growing, at most this many times.
SETTLE_READS = 6
SETTLE_INTERVAL_S = 0.25
_ERROR_LINE = re.compile(r"(^\w*(Error|Exception|Exit)\b.*:|^ERROR\b|\bError:|CUDA out of memory)")


def excerpt(lines: list[str]) -> list[str]:
    """The lines that say why: exception and ERROR lines, else the last lines."""
    errors = [line.strip() for line in lines if _ERROR_LINE.search(line.strip())]
    return (errors or [line.strip() for line in lines])[-EXCERPT_MAX_LINES:]


async def settled_tail(unit: str, since_epoch_s: float) -> list[str]:
    """Like `tail`, but waits for the journal to catch up with a process that just died."""
    lines: list[str] = []
    for _ in range(SETTLE_READS):
        await trio.sleep(SETTLE_INTERVAL_S)
        newer = await tail(unit, since_epoch_s)
        if newer and newer == lines:
            break
        lines = newer
    return lines


async def tail(unit: str, since_epoch_s: float, lines: int = TAIL_LINES) -> list[str]:
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




# vLLM's start-up, summarised from its log lines (the last match wins).
_PHASES = (
    (re.compile(r"Started engine process|Initializing a V1 LLM engine|non-default args"), "initialising"),
    (re.compile(r"Loading weights|Loading model|Loading safetensors"), "loading weights"),
    (re.compile(r"torch\.compile|Compiling a graph|Dynamo bytecode"), "compiling"),
    (re.compile(r"Available KV cache memory|GPU KV cache size|profil", re.IGNORECASE), "profiling memory"),
    (re.compile(r"Capturing CUDA graph|Graph capturing"), "capturing CUDA graphs"),
    (re.compile(r"Starting vLLM API server|Application startup|Started server process"),
     "starting API server"),
)


def start_phase(lines: list[str]) -> str | None:
    """The phase of a start-up that these log lines show, if any."""
    phase = None
    for line in lines:
        for pattern, name in _PHASES:
            if pattern.search(line):
                phase = name
    return phase
