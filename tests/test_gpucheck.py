"""scripts/gpu-check without a GPU: its pure parts, and that it says clearly
that there is nothing to check, with its own exit status."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from shim import gpucheck
from shim.gpucheck import EXIT_FAILED, EXIT_NO_GPU, EXIT_OK, Check, back_check, held_check, parse_detect
from shim.placement import Device, EngineView, plan

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu-check"
# a fake torch ("VRAM" is RAM) and a fake pynvml reading it back
FAKES = REPO / "tests" / "fakegpu"
MiB = 2**20
GiB = 2**30


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          check=False)


def fake_python(tmp_path: Path, line: str) -> str:
    exe = tmp_path / "python"
    exe.write_text(f"#!/bin/sh\necho '{line}'\n")
    exe.chmod(0o755)
    return str(exe)


def test_without_torch_it_says_so_and_exits_3(tmp_path: Path) -> None:
    done = run("--python", str(tmp_path / "no-such-python"))
    assert done.returncode == EXIT_NO_GPU == 3
    assert "gpu-check: no torch to hold GPU memory with" in done.stdout
    assert "nothing was checked (exit 3)" in done.stdout


def test_with_torch_but_no_gpu_it_says_so_and_exits_3(tmp_path: Path) -> None:
    done = run("--python", fake_python(tmp_path, "cuda 0 0"))
    assert done.returncode == EXIT_NO_GPU
    assert "gpu-check: no GPU found: torch sees no CUDA device; nothing was checked" in done.stdout


def test_a_gpu_index_torch_does_not_see_is_named(tmp_path: Path) -> None:
    done = run("--gpu", "2", "--python", fake_python(tmp_path, "cuda 1 1"))
    assert done.returncode == EXIT_NO_GPU and "no GPU 2: torch sees 1" in done.stdout


def test_a_python_that_prints_something_else_has_no_torch(tmp_path: Path) -> None:
    done = run("--python", fake_python(tmp_path, "Traceback: No module named torch"))
    assert done.returncode == EXIT_NO_GPU and "no torch found" in done.stdout


@pytest.mark.parametrize(("out", "found"), [
    ("cuda 1 2\n", (True, 2)), ("warning\ncuda 0 0", (False, 0)), ("", None), ("cuda yes 1", None),
])
def test_the_probe_line_parses(out: str, found: tuple[bool, int] | None) -> None:
    assert parse_detect(out) == found


def test_the_fake_engine_is_valid_python_holding_the_asked_size() -> None:
    code = gpucheck.hold_code(0, 512)
    compile(code, "fake-engine", "exec")
    assert "512 * 2**20" in code and "cuda:0" in code and "print('holding'" in code


def test_verdicts() -> None:
    assert held_check("x", 2 * GiB + 300 * MiB, 2 * GiB).ok  # a CUDA context on top
    assert not held_check("x", GiB, 2 * GiB).ok
    assert not held_check("x", 8 * GiB, 2 * GiB).ok
    assert back_check(10 * GiB, 10 * GiB - 100 * MiB, 1.5).ok
    assert "in 1.50 s" in back_check(10 * GiB, 10 * GiB, 1.5).detail
    back = back_check(10 * GiB, 6 * GiB, None)
    assert not back.ok and "never" in back.detail


def test_admission_verdicts_use_the_plan() -> None:
    device = {1: Device(80 * GiB, GiB)}
    big = plan(EngineView("engine", 2 * GiB, gpus=(1,)), [], devices=device, now=0.0, min_residency_s=0.0)
    small = plan(EngineView("small", 256 * MiB, gpus=(1,)), [], devices=device, now=0.0, min_residency_s=0.0)
    checks = gpucheck.admission_checks("a", big, small)
    assert all(c.ok for c in checks), checks
    assert "on GPU 1" in checks[0].detail
    assert not any(c.ok for c in gpucheck.admission_checks("a", small, big))


def test_the_report_counts_and_sets_the_exit_status() -> None:
    text, code = gpucheck.report([Check("a", True, "fine"), Check("b", False, "bad")])
    assert code == EXIT_FAILED
    assert text.splitlines() == ["ok    a: fine", "FAIL  b: bad", "gpu-check: 1 passed, 1 failed"]
    assert gpucheck.report([Check("a", True, "")])[1] == EXIT_OK


def test_the_whole_check_runs_against_a_stand_in_gpu(tmp_path: Path) -> None:
    """Every step of the check, on a fake torch whose "VRAM" is RAM and a fake
    NVML that reads it back: the flow, the figures and the verdicts, not the GPU."""
    fakes = tmp_path / uuid.uuid4().hex
    shutil.copytree(FAKES, fakes)
    env = {**os.environ, "PYTHONPATH": str(fakes), "FAKE_GPU_TOTAL_MIB": "512", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--no-systemd", "--hold-mib", "64",
                           "--context-mib", "16", "--python", sys.executable],
                          capture_output=True, text=True, timeout=240, env=env, check=False)
    assert done.returncode == EXIT_OK, done.stdout + done.stderr
    out = done.stdout
    assert "gpu-check: nvml GPU 0 (Fake GPU): 512 MiB total" in out
    assert "fake engines run as process groups" in out
    for name in ("NVML per-process usage of the engine's processes", "NVML device used memory grew",
                 "memory back after the stop", "an engine that does not fit is refused",
                 "an engine that fits is admitted", "admission once it left"):
        assert f"ok    {name}" in out or f"ok    admission beside another program: {name}" in out, name
    assert "not enough GPU memory for the engine 'engine' on GPU 0: it needs 64 MiB" in out
    assert "gpu-check: 7 passed, 0 failed" in out
