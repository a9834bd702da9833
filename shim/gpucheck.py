"""`scripts/gpu-check`: what the gateway assumes about a real GPU, checked on one.

It needs no network and installs nothing. Fake engines are python processes
that hold real VRAM with torch (the interpreter given by --python, which
must have torch with CUDA); the checker itself never touches CUDA, so its
own process holds no memory on the GPU. It checks, on one GPU:

1. NVML's device reading, and that a fake engine's memory shows both in the
   device's used memory and in NVML's per-process usage of the engine's
   processes (what shim/meter.py adds up for an engine's unit);
2. that the memory comes back after a stop: the engine runs as a transient
   systemd user unit with KillMode=control-group where a user manager is
   reachable (its stop kills the cgroup, as for vllm.service), else as a
   process group that is killed;
3. admission when another program holds memory: with a hog holding most of
   the GPU, `placement.plan` refuses an engine that no longer fits, naming
   the GPU and the figures, and admits one that does.

It prints every figure and a verdict per check. Exit status: 0 when every
check passed, 1 when one failed, 3 when there is no GPU or no torch to check
with (nothing was checked). The whole run is bounded by DEADLINE_S.

The pure parts (argument and probe parsing, the verdicts, the report) do no
I/O; tests/test_gpucheck.py covers them and the no-GPU path.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from .gpu import NvmlProbe, cgroup_dir, format_bytes, held_by, tree_pids
from .placement import Device, EngineView, Fits, Refuse, plan

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_GPU = 3
MiB = 2**20
# The bound: the whole check in under five minutes.
DEADLINE_S = 280.0
# A fake engine loads its memory in a second or two; torch's import and
# CUDA's initialisation take most of that.
HOLD_WITHIN_S = 60.0
# vLLM's own figure for how fast VRAM comes back is "seconds"; the unit's
# stop timeout is 30 s by default.
BACK_WITHIN_S = 30.0
POLL_S = 0.2
# A CUDA context alone takes a few hundred MiB; a reading within this of
# the expectation counts as the same.
SLACK = 256 * MiB
# What the other program leaves besides half an engine: its own CUDA context
# takes part of it.
HOG_CONTEXT = 1024 * MiB
# What a fake engine started as a unit takes from the checker's environment.
PASS_ENV = ("PYTHONPATH", "LD_LIBRARY_PATH")
DETECT = "import torch; print('cuda', int(torch.cuda.is_available()), torch.cuda.device_count())"


def hold_code(index: int, mib: int) -> str:
    """A fake engine: hold `mib` MiB on GPU `index`, say so, and wait to be killed."""
    return (
        "import sys, time, torch\n"
        f"x = torch.empty({mib} * 2**20, dtype=torch.uint8, device='cuda:{index}')\n"
        "x.fill_(1)\n"
        "torch.cuda.synchronize()\n"
        "print('holding', flush=True)\n"
        "time.sleep(3600)\n"
    )


def parse_detect(out: str) -> tuple[bool, int] | None:
    """(CUDA available, device count) from DETECT's line; None when it printed something else."""
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "cuda" and fields[1] in ("0", "1") and fields[2].isdigit():
            return fields[1] == "1", int(fields[2])
    return None


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def held_check(name: str, seen: int, expected: int) -> Check:
    """At least what was allocated, and not more than a CUDA context beyond (x4 slack)."""
    ok = expected - SLACK <= seen <= expected + 4 * SLACK + expected // 10
    return Check(name, ok, f"{format_bytes(seen)} seen, {format_bytes(expected)} held")


def back_check(before_free: int, after_free: int, took_s: float | None) -> Check:
    back = took_s is not None and after_free >= before_free - SLACK
    when = "never" if took_s is None else f"in {took_s:.2f} s"
    return Check("memory back after the stop", back,
                 f"free {format_bytes(after_free)} (before the engine: {format_bytes(before_free)}), {when}")


def admission_checks(name: str, too_big: object, fits: object) -> list[Check]:
    refused = isinstance(too_big, Refuse) and "on GPU" in too_big.message
    return [
        Check(f"{name}: an engine that does not fit is refused", refused,
              too_big.message if isinstance(too_big, Refuse) else f"got {too_big!r}"),
        Check(f"{name}: an engine that fits is admitted", isinstance(fits, Fits), f"got {fits!r}"),
    ]


def report(checks: Sequence[Check]) -> tuple[str, int]:
    lines = [f"{'ok' if c.ok else 'FAIL':4}  {c.name}: {c.detail}" for c in checks]
    failed = sum(not c.ok for c in checks)
    lines.append(f"gpu-check: {len(checks) - failed} passed, {failed} failed")
    return "\n".join(lines), EXIT_OK if failed == 0 else EXIT_FAILED


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu-check", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--gpu", type=int, default=0, help="the GPU index to check (NVML's numbering; default 0)")
    p.add_argument("--hold-mib", type=int, default=2048, help="what a fake engine holds (default 2048)")
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter with torch for the fake engines (default: this one)")
    p.add_argument("--no-systemd", action="store_true", help="run fake engines as plain processes")
    p.add_argument("--context-mib", type=int, default=HOG_CONTEXT // MiB,
                   help="what the other program's own CUDA context may take (default 1024)")
    return p.parse_args(argv)


# ---- I/O ----


def say(line: str) -> None:
    print(f"gpu-check: {line}", flush=True)


def detect(python: str, index: int) -> str | None:
    """Why nothing can be checked, or None when torch sees the GPU."""
    try:
        done = subprocess.run([python, "-c", DETECT], capture_output=True, text=True, timeout=120,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no torch to hold GPU memory with: cannot run {python}: {e}"
    found = parse_detect(done.stdout)
    if found is None:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no torch found for {python} ({last})"
    available, count = found
    if not available or count == 0:
        return "no GPU found: torch sees no CUDA device"
    if index >= count:
        return f"no GPU {index}: torch sees {count}"
    try:
        __import__("pynvml")
    except ImportError:
        return "no NVML: install nvidia-ml-py (module pynvml) where the gateway runs"
    return None


class FakeEngine:
    """A python process holding VRAM: a transient user unit, or a process group."""

    def __init__(self, args: argparse.Namespace, mib: int, systemd_ok: bool) -> None:
        self.unit = f"gpucheck-{uuid.uuid4().hex[:8]}.service" if systemd_ok else ""
        code = hold_code(0, mib)
        # the child sees only the checked GPU, as an engine with `gpus` does
        env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(args.gpu)}
        if self.unit:
            # a unit starts from the manager's environment: pass on where torch and CUDA are
            passed = [f"--setenv={k}={os.environ[k]}" for k in PASS_ENV if k in os.environ]
            subprocess.run(["systemd-run", "--user", "--quiet", f"--unit={self.unit}",
                            "--property=KillMode=control-group",
                            "--setenv=CUDA_DEVICE_ORDER=PCI_BUS_ID",
                            f"--setenv=CUDA_VISIBLE_DEVICES={args.gpu}", *passed,
                            args.python, "-c", code], check=True, timeout=30)
            self.proc = None
        else:
            self.proc = subprocess.Popen([args.python, "-c", code], env=env, start_new_session=True,
                                         stdout=subprocess.DEVNULL)

    def pids(self) -> set[int]:
        if self.proc is not None:
            return {self.proc.pid}
        out = subprocess.run(["systemctl", "--user", "show", "-P", "ControlGroup", self.unit],
                             capture_output=True, text=True, check=False).stdout.strip()
        top = cgroup_dir(out) if out else None
        return tree_pids(top) if top else set()

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        else:
            subprocess.run(["systemctl", "--user", "stop", self.unit], check=False, timeout=60)


def user_manager() -> bool:
    if shutil.which("systemd-run") is None:
        return False
    done = subprocess.run(["systemctl", "--user", "is-system-running"], capture_output=True, text=True,
                          check=False, timeout=10)
    return done.stdout.strip() in ("running", "degraded", "starting")


async def until_holding(probe: NvmlProbe, engine: FakeEngine, want: int) -> tuple[int, float | None]:
    """Poll NVML until the engine's processes hold `want`; (what they hold, seconds or None)."""
    t0 = time.monotonic()
    seen = 0
    while time.monotonic() - t0 < HOLD_WITHIN_S:
        usage = await probe.processes() or {}
        seen = held_by(usage, engine.pids())
        if seen >= want:
            return seen, time.monotonic() - t0
        await trio.sleep(POLL_S)
    return seen, None


async def until_back(probe: NvmlProbe, before_free: int) -> tuple[int, float | None]:
    t0 = time.monotonic()
    free = 0
    while time.monotonic() - t0 < BACK_WITHIN_S:
        reading = await probe.memory()
        free = reading.free if reading else 0
        if free >= before_free - SLACK:
            return free, time.monotonic() - t0
        await trio.sleep(POLL_S)
    return free, None


async def run_checks(args: argparse.Namespace) -> list[Check]:
    probe = NvmlProbe(args.gpu)
    checks: list[Check] = []
    first = await probe.memory()
    if first is None:
        return [Check("NVML device reading", False, "NVML gave no reading (see the warning above)")]
    say(f"{first.source}: {format_bytes(first.total)} total, {format_bytes(first.free)} free")
    checks.append(Check("NVML device reading", 0 < first.free <= first.total, str(first)))
    systemd_ok = not args.no_systemd and user_manager()
    say("fake engines run as " + ("transient user units (KillMode=control-group)" if systemd_ok
                                  else "process groups (no systemd user manager here)"))
    want = args.hold_mib * MiB

    engine = FakeEngine(args, args.hold_mib, systemd_ok)
    try:
        seen, took = await until_holding(probe, engine, want)
        checks.append(held_check("NVML per-process usage of the engine's processes", seen, want))
        say(f"engine holds {format_bytes(seen)} after {'-' if took is None else f'{took:.1f} s'}")
        during = await probe.memory()
        used = first.free - (during.free if during else first.free)
        checks.append(held_check("NVML device used memory grew by the engine", used, want))
    finally:
        engine.stop()
    free, back_s = await until_back(probe, first.free)
    checks.append(back_check(first.free, free, back_s))

    # another program holds all but half an engine and its own CUDA context
    now = await probe.memory()
    hog_mib = max(0, (now.free if now else 0) - want // 2 - args.context_mib * MiB) // MiB
    say(f"another program takes {format_bytes(hog_mib * MiB)}")
    hog = FakeEngine(args, hog_mib, systemd_ok)
    try:
        await until_holding(probe, hog, hog_mib * MiB)
        busy = await probe.memory()
        device = {args.gpu: Device(first.total, busy.free if busy else None)}
        say(f"with it: {busy}")
        target = EngineView("engine", want, gpus=(args.gpu,))
        small = EngineView("small", want // 8, gpus=(args.gpu,))
        checks += admission_checks(
            "admission beside another program",
            plan(target, [], devices=device, now=0.0, min_residency_s=0.0),
            plan(small, [], devices=device, now=0.0, min_residency_s=0.0),
        )
    finally:
        hog.stop()
    free, back_s = await until_back(probe, first.free)
    after = {args.gpu: Device(first.total, free)}
    checks.append(Check("admission once it left", back_s is not None and isinstance(
        plan(EngineView("engine", want, gpus=(args.gpu,)), [], devices=after, now=0.0, min_residency_s=0.0),
        Fits), f"free {format_bytes(free)}"))
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    why = detect(args.python, args.gpu)
    if why is not None:
        say(f"{why}; nothing was checked (exit {EXIT_NO_GPU})")
        return EXIT_NO_GPU
    t0 = time.monotonic()
    checks = trio.run(_bounded, args)
    text, code = report(checks)
    print(text)
    say(f"took {time.monotonic() - t0:.1f} s")
    return code


async def _bounded(args: argparse.Namespace) -> list[Check]:
    with trio.move_on_after(DEADLINE_S) as scope:
        return await run_checks(args)
    assert scope.cancelled_caught
    return [Check("finished in time", False, f"stopped after {DEADLINE_S:g} s")]
