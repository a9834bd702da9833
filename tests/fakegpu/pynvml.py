"""A stand-in for nvidia-ml-py in scripts/gpu-check's tests.

GPU 0 has FAKE_GPU_TOTAL_MIB; its "processes" are those whose environment
has the same PYTHONPATH as ours (the fake engines that gpu-check starts, from
a folder of their own per test), each holding its resident memory (VmRSS)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any


class NVMLError(Exception):
    pass


def _mark() -> bytes:
    return f"PYTHONPATH={os.environ['PYTHONPATH']}".encode()


def _processes() -> list[Any]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if _mark() not in (d / "environ").read_bytes().split(b"\0"):
                continue
            status = (d / "status").read_text()
        except OSError:
            continue
        rss = [line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")]
        if rss:
            out.append(SimpleNamespace(pid=int(d.name), usedGpuMemory=int(rss[0]) * 1024))
    return out


def nvmlInit() -> None:
    return None


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    if index != 0:
        raise NVMLError("Invalid Argument")
    return index


def nvmlDeviceGetName(handle: int) -> str:
    return "Fake GPU"


def nvmlDeviceGetMemoryInfo(handle: int) -> Any:
    total = int(os.environ["FAKE_GPU_TOTAL_MIB"]) << 20
    used = sum(p.usedGpuMemory for p in _processes())
    return SimpleNamespace(total=total, free=max(0, total - used), used=used)


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[Any]:
    return _processes()
