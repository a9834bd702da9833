"""scripts/gpu-check's fake engines as transient user units, in a real systemd
user manager: started with KillMode=control-group, measured through the unit's
cgroup, and stopped by the unit's stop. The GPU is the stand-in of
tests/fakegpu (a fake torch whose "VRAM" is RAM, a fake pynvml reading it)."""

from __future__ import annotations

import sys
import uuid

import pytest

from tests.sandboxing import Sandbox
from tests.test_gpucheck import FAKES, SCRIPT

pytestmark = pytest.mark.sandbox


def test_the_check_runs_its_fake_engines_as_units_and_stops_them(sandbox: Sandbox) -> None:
    fakes = f"{sandbox.env['HOME']}/gpucheck-{uuid.uuid4().hex[:8]}"
    for source in FAKES.rglob("*.py"):
        sandbox.write_file(f"{fakes}/{source.relative_to(FAKES)}", source.read_text())
    done = sandbox.run([sys.executable, str(SCRIPT), "--hold-mib", "64", "--context-mib", "16",
                        "--python", sys.executable],
                       env={"PYTHONPATH": fakes, "FAKE_GPU_TOTAL_MIB": "512", "PYTHONUNBUFFERED": "1"},
                       check=False, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "fake engines run as transient user units (KillMode=control-group)" in out
    assert "gpu-check: 7 passed, 0 failed" in out
    # every fake engine's unit is gone
    left = sandbox.systemctl("list-units", "--all", "--no-legend", "gpucheck-*", check=False).stdout
    assert "gpucheck-" not in left, left
