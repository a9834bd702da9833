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
# A start of vLLM 0.32 logs about a hundred lines; read all of them for its phase.
PHASE_LINES = 2000
JOURNALCTL_TIMEOUT_S = 5.0
# Journald can receive a dying process's last lines just after systemd reports
# its end: read until the tail stops growing, at most this many times.
SETTLE_READS = 6
SETTLE_INTERVAL_S = 0.25
# An exception's line (`RuntimeError: ...`, `pydantic_core._pydantic_core.ValidationError: ...`),
# pydantic's reason under it (`Value error, ...`), an ERROR line.
_ERROR_LINE = re.compile(
    r"(^[\w.]*(Error|Exception|Exit)\b.*:|^ERROR\b|\bError:|CUDA out of memory|^Value error, )"
)
# Traceback decoration alone on a line: ^^^^^, ~~~~~
_DECORATION = re.compile(r"^[\s^~]*$")


def excerpt(lines: list[str]) -> list[str]:
    """The lines that say why: exception and ERROR lines, else the last
    lines; never the decoration of a traceback."""
    kept = [line.strip() for line in lines if not _DECORATION.match(line)]
    errors = [line for line in kept if _ERROR_LINE.search(line)]
    return (errors or kept)[-EXCERPT_MAX_LINES:]


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


# vLLM's start-up, in the order it goes through it, each phase with the log
# lines that begin it (read from vLLM 0.32's own output; see
# tests/fixtures/vllm-0.32-*). Before any of them the process is starting
# (python imports vLLM and torch: the first 10 to 20 s on a small machine).
STARTING_PROCESS = "starting process"
PHASES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("initialising", re.compile(r"non-default args|Resolved architecture|█\s+version \d")),
    ("starting engine", re.compile(r"Initializing a V1 LLM engine|Started engine process")),
    ("loading weights", re.compile(r"Starting to load model|Loading weights|Loading safetensors"
                                   r"|Loading model")),
    # not `Enforce eager set, disabling torch.compile` nor `Inductor compilation was disabled`
    ("compiling", re.compile(r"Warming up model for the compilation|Compiling a graph|Dynamo bytecode"
                             r"|torch\.compile takes|Compiling model")),
    ("profiling memory", re.compile(r"Available KV cache memory|KV cache size|for KV cache|Memory profiling"
                                    r"|init engine \(profile")),
    ("capturing CUDA graphs", re.compile(r"Capturing CUDA graph|Graph capturing")),
    ("starting API server", re.compile(r"Starting vLLM (API )?server|Application startup"
                                       r"|Started server process")),
)
PHASE_NAMES = (STARTING_PROCESS, *(name for name, _ in PHASES))


def start_phase(lines: list[str], at_least: str = STARTING_PROCESS) -> str:
    """The phase of a start-up that these log lines show: the furthest one
    reached, and never one before `at_least` (what was shown before), so
    that phases only move forward."""
    reached = PHASE_NAMES.index(at_least) if at_least in PHASE_NAMES else 0
    for line in lines:
        for i, (_, pattern) in enumerate(PHASES[reached:], start=reached + 1):
            if pattern.search(line):
                reached = i
    return PHASE_NAMES[reached]
