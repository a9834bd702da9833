"""How much GPU memory is free now, so that the gateway can tell whether another
engine fits before it starts one.

A `GpuProbe` answers a `GpuMemory` (total and free bytes, and where the figures
came from) or None when it cannot tell right now; it never raises. Two probes:

- `NvmlProbe` asks the NVIDIA driver through NVML (the optional package
  nvidia-ml-py, module `pynvml`), imported on first use. NVML blocks, so each
  call runs in a worker thread.
- `SliceProbe` is a fake GPU for tests and for trying multi-engine set-ups on a
  machine without one: its total is a configured budget, and its used memory is
  the RAM that every process in one systemd slice holds (engines started with
  `TransientService(slice=...)`, and fake-vllm's `--hold-rss-mb` ballast in
  place of weights and KV cache).

SliceProbe reads the slice's MemoryCurrent over D-Bus: systemd sums the whole
cgroup tree below the slice in the kernel's memory controller, so a process's
memory is counted once however many processes share it, and memory a process
frees or leaves with on exit is gone from the figure at once (under 0.1 s in
the test sandbox, which mounts the cgroup v1 memory controller). Only where
systemd has no figure (memory accounting off, or no memory controller for the
user manager) does it fall back to adding up VmRSS of the processes listed in
the slice's cgroup tree; that counts pages shared between processes more than
once, and it needs the cgroup file system and /proc of the manager's own
namespaces. On cgroup v1 MemoryCurrent also counts page cache that the slice's
processes read; for the fake that is a few MiB at most.

With several GPUs there is one probe per device (`probes_for`): an
NvmlProbe for each index an engine names, or a SliceProbe for each fake
device of `[gateway.fake_gpu]`.

NvmlProbe also reads what each process holds on its GPU
(nvmlDeviceGetComputeRunningProcesses), so that the gateway can measure what
an engine really holds (shim/meter.py).

The pure parts (`format_bytes`, `parse_vm_rss`, `slice_memory`,
`process_usage`, `held_by`) do no I/O.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from .systemd import Systemd

log = logging.getLogger("vllm_gateway.gpu")

# Where the cgroup tree of a unit may be found, in order: pure cgroup v2, the
# hybrid layout's v2 and name=systemd hierarchies (the latter always lists the
# processes of systemd's units).
CGROUP_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"))
PROC = Path("/proc")


@dataclass(frozen=True)
class GpuMemory:
    total: int  # bytes
    free: int  # bytes
    source: str  # e.g. "nvml GPU 0 (NVIDIA H100)" or "fake GPU: RAM of fake-gpu.slice"

    @property
    def used(self) -> int:
        return self.total - self.free

    def __str__(self) -> str:
        return f"{format_bytes(self.free)} free of {format_bytes(self.total)} ({self.source})"


class GpuProbe(Protocol):
    async def memory(self) -> GpuMemory | None:
        """Total and free memory now; None when unknown now (never raises)."""
        ...

    def describe(self) -> str:
        """What is measured, for logs and status (also before the first reading)."""
        ...


# ---- pure parts ----


def format_bytes(n: int) -> str:
    """Binary units, one decimal below ten: "512 MiB", "5.8 GiB", "80 GiB"."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            break
        size /= 1024
    if unit == "B" or abs(size) >= 10 or size == int(size):
        return f"{size:.0f} {unit}"
    return f"{size:.1f} {unit}"


def parse_vm_rss(status: str) -> int | None:
    """The resident set in bytes from the text of /proc/PID/status; None without
    a VmRSS line (kernel threads, and zombies)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            fields = line.split()
            return int(fields[1]) * 1024  # always in kB
    return None


def slice_memory(slice: str, total: int, used: int) -> GpuMemory:
    """The fake GPU's reading: what the slice holds is taken from the budget."""
    return GpuMemory(total=total, free=max(0, total - used), source=f"fake GPU: RAM of {slice}")


def process_usage(processes: Iterable[Any]) -> dict[int, int]:
    """pid -> bytes from NVML's process list; entries without a figure
    (usedGpuMemory None: NVML cannot tell, e.g. without the rights) are left
    out, and a pid listed twice (one entry per context) is added up."""
    usage: dict[int, int] = {}
    for p in processes:
        used = getattr(p, "usedGpuMemory", None)
        if used is None:
            continue
        usage[int(p.pid)] = usage.get(int(p.pid), 0) + int(used)
    return usage


def held_by(usage: Mapping[int, int], pids: Iterable[int]) -> int:
    """What the given processes hold, from a pid -> bytes reading."""
    return sum(usage.get(pid, 0) for pid in set(pids))


def describe_nvml(index: int, name: str) -> str:
    return f"nvml GPU {index} ({name})" if name else f"nvml GPU {index}"


# ---- the cgroup tree, for SliceProbe's fallback ----


def cgroup_dir(control_group: str, roots: Sequence[Path] = CGROUP_ROOTS) -> Path | None:
    """The folder of a cgroup path ("/app.slice/x.service") in the first
    hierarchy that lists processes for it."""
    for root in roots:
        d = root / control_group.lstrip("/")
        if (d / "cgroup.procs").is_file():
            return d
    return None


def tree_pids(top: Path) -> set[int]:
    pids: set[int] = set()
    for folder, _dirs, files in os.walk(top):
        if "cgroup.procs" in files:
            try:
                pids.update(int(p) for p in (Path(folder) / "cgroup.procs").read_text().split())
            except OSError:  # removed while we walk: its processes have left
                continue
    return pids


def rss_sum(pids: Iterable[int], proc: Path = PROC) -> int:
    total = 0
    for pid in pids:
        try:
            total += parse_vm_rss((proc / str(pid) / "status").read_text()) or 0
        except OSError:  # exited meanwhile
            continue
    return total


def cgroup_rss(control_group: str, roots: Sequence[Path] = CGROUP_ROOTS, proc: Path = PROC) -> int | None:
    """The summed VmRSS of every process in the cgroup tree; None when the
    cgroup cannot be found here (another cgroup namespace, no cgroup file system)."""
    top = cgroup_dir(control_group, roots)
    if top is None:
        return None
    return rss_sum(tree_pids(top), proc)


# ---- probes ----


class _Complaint:
    """Logs why a probe has no reading once per run of failures, not at every call."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failing = False

    def fail(self, reason: str) -> None:
        if not self.failing:
            log.warning("%s: no memory reading: %s", self.what, reason)
        self.failing = True

    def ok(self) -> None:
        if self.failing:
            log.info("%s: memory readings again", self.what)
        self.failing = False


class NullProbe:
    """No GPU to ask: every reading is unknown (the gateway then admits engines blindly)."""

    async def memory(self) -> GpuMemory | None:
        return None

    def describe(self) -> str:
        return "no GPU probe"


class NvmlProbe:
    """One NVIDIA GPU by index, through NVML; see the module docstring."""

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self._nvml: Any = None  # the pynvml module once imported
        self._handle: Any = None  # set once nvmlInit and the handle succeeded
        self._name = ""
        self._missing = ""  # why pynvml cannot be imported; then we never try again
        self._lock = trio.Lock()
        self._complaint = _Complaint(f"nvml GPU {index}")

    def describe(self) -> str:
        return describe_nvml(self.index, self._name)

    async def memory(self) -> GpuMemory | None:
        if self._missing:
            return None
        async with self._lock:  # one thread at a time; the first call initialises NVML
            try:
                reading = await trio.to_thread.run_sync(self._read)
            except ImportError as e:
                self._missing = f"nvidia-ml-py is not installed ({e})"
                self._complaint.fail(self._missing)
                return None
            except Exception as e:  # pynvml.NVMLError: no driver, no such GPU, GPU lost
                self._handle = None  # initialise again next time: the driver may come back
                self._complaint.fail(f"{type(e).__name__}: {e}")
                return None
        self._complaint.ok()
        return reading

    def _read(self) -> GpuMemory:
        """In a worker thread: NVML blocks."""
        if self._nvml is None:
            self._nvml = importlib.import_module("pynvml")
        nvml = self._nvml
        if self._handle is None:
            nvml.nvmlInit()
            handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
            name = nvml.nvmlDeviceGetName(handle)
            self._name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            self._handle = handle
        info = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return GpuMemory(total=int(info.total), free=int(info.free), source=self.describe())

    async def processes(self) -> dict[int, int] | None:
        """pid -> bytes each process holds on this GPU now; None when unknown (never raises)."""
        if self._missing:
            return None
        async with self._lock:
            try:
                return await trio.to_thread.run_sync(self._read_processes)
            except ImportError as e:
                self._missing = f"nvidia-ml-py is not installed ({e})"
                self._complaint.fail(self._missing)
            except Exception as e:  # pynvml.NVMLError
                self._handle = None
                self._complaint.fail(f"{type(e).__name__}: {e}")
        return None

    def _read_processes(self) -> dict[int, int]:
        """In a worker thread."""
        self._read()  # initialises NVML and the handle when needed
        return process_usage(self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle))


class SliceProbe:
    """A fake GPU: a memory budget, less what a systemd slice holds; see the module docstring."""

    def __init__(self, systemd: Systemd, slice: str, total: int) -> None:
        self.systemd = systemd
        self.slice = slice
        self.total = total
        self._complaint = _Complaint(f"fake GPU {slice}")

    def describe(self) -> str:
        return f"fake GPU: RAM of {self.slice}, a budget of {format_bytes(self.total)}"

    async def memory(self) -> GpuMemory | None:
        try:
            used = await self._used()
        except Exception as e:  # the bus went away, or systemd refused
            self._complaint.fail(f"{type(e).__name__}: {e}")
            return None
        if used is None:
            self._complaint.fail("systemd has no MemoryCurrent for it (memory accounting off?) "
                                 "and its cgroup is not visible here")
            return None
        self._complaint.ok()
        return slice_memory(self.slice, self.total, used)

    async def _used(self) -> int | None:
        control_group = await self.systemd.control_group(self.slice)
        if not control_group:
            return 0  # not loaded, or never realised: no process in it
        used = await self.systemd.memory_current(self.slice)
        if used is not None:
            return used
        return await trio.to_thread.run_sync(cgroup_rss, control_group)


def probes_for(
    fake: Sequence[tuple[str, int]], devices: Iterable[int], systemd: Systemd, nvml: bool,
) -> dict[int, GpuProbe]:
    """One probe per GPU: the fake devices (slice, budget) by their place in
    the list when there are any, else NVML for each index in `devices` where
    `nvml` (nvidia-ml-py is installed); no probe otherwise."""
    if fake:
        return {i: SliceProbe(systemd, slice, total) for i, (slice, total) in enumerate(fake)}
    if nvml:
        return {i: NvmlProbe(i) for i in sorted(set(devices))}
    return {}
