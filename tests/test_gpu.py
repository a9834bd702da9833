"""shim.gpu: the pure parts, NvmlProbe against a made-up pynvml, SliceProbe against a made-up Systemd."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path
from typing import Any, cast

import pytest

from shim import gpu
from shim.gpu import GpuMemory, NullProbe, NvmlProbe, SliceProbe, format_bytes
from shim.systemd import Systemd, SystemdError, TransientService

GiB = 1024**3
MiB = 1024**2

# -- pure parts -----------------------------------------------------------------


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (2048, "2 KiB"), (512 * MiB, "512 MiB"), (1536 * MiB, "1.5 GiB"),
    (int(5.8 * GiB), "5.8 GiB"), (GiB, "1 GiB"), (80 * GiB, "80 GiB"), (3 * 1024 * GiB, "3 TiB"),
])
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_parse_vm_rss() -> None:
    status = "Name:\tpython3\nVmPeak:\t  9000 kB\nVmRSS:\t  204800 kB\nThreads:\t1\n"
    assert gpu.parse_vm_rss(status) == 200 * MiB
    assert gpu.parse_vm_rss("Name:\tkthreadd\nThreads:\t1\n") is None


def test_slice_memory_takes_the_slice_from_the_budget() -> None:
    m = gpu.slice_memory("vllm.slice", 10 * GiB, 3 * GiB)
    assert m == GpuMemory(total=10 * GiB, free=7 * GiB, source="fake GPU: RAM of vllm.slice")
    assert m.used == 3 * GiB
    assert str(m) == "7 GiB free of 10 GiB (fake GPU: RAM of vllm.slice)"
    # More held than the budget: nothing free, never negative.
    assert gpu.slice_memory("vllm.slice", GiB, 2 * GiB).free == 0


def test_cgroup_rss_adds_up_the_whole_tree(tmp_path: Path) -> None:
    cgroups, proc = tmp_path / "cgroup", tmp_path / "proc"
    files = {
        cgroups / "app.slice/gpu.slice/cgroup.procs": "",
        cgroups / "app.slice/gpu.slice/a.service/cgroup.procs": "10\n11\n",
        cgroups / "app.slice/gpu.slice/b.service/cgroup.procs": "12\n13\n",
        cgroups / "app.slice/other.service/cgroup.procs": "14\n",
        proc / "10/status": "VmRSS:\t    1024 kB\n",
        proc / "11/status": "Name:\tzombie\n",  # no VmRSS line
        proc / "12/status": "VmRSS:\t    2048 kB\n",
        proc / "14/status": "VmRSS:\t    4096 kB\n",
        # 13 has exited meanwhile: no /proc entry
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    roots = [tmp_path / "absent", cgroups]
    assert gpu.cgroup_rss("/app.slice/gpu.slice", roots, proc) == 3 * MiB
    assert gpu.cgroup_rss("/app.slice/none.slice", roots, proc) is None


def test_a_transient_service_goes_into_its_slice() -> None:
    svc = TransientService(name="e.service", argv=["/bin/true"], environment={}, description="d",
                           stop_timeout_s=1, syslog_identifier="e")
    assert "Slice" not in dict(svc.properties())
    placed = TransientService(**{**svc.__dict__, "slice": "vllm.slice"})
    assert dict(placed.properties())["Slice"] == ("s", "vllm.slice")


async def test_null_probe_knows_nothing() -> None:
    assert await NullProbe().memory() is None
    assert NullProbe().describe() == "no GPU probe"


# -- NvmlProbe ------------------------------------------------------------------


class NVMLError(Exception):
    pass


def fake_pynvml(*, init_error: str | None = None, name: Any = "NVIDIA H100 80GB HBM3") -> Any:
    calls: list[str] = []
    mod: Any = types.ModuleType("pynvml")
    mod.NVMLError = NVMLError
    mod.calls = calls

    def init() -> None:
        calls.append("init")
        if init_error:
            raise NVMLError(init_error)

    def handle(index: int) -> str:
        calls.append(f"handle {index}")
        return f"h{index}"

    def memory_info(h: str) -> Any:
        calls.append(f"memory {h}")
        return types.SimpleNamespace(total=80 * GiB, free=70 * GiB, used=10 * GiB)

    mod.nvmlInit = init
    mod.nvmlDeviceGetHandleByIndex = handle
    mod.nvmlDeviceGetName = lambda h: name
    mod.nvmlDeviceGetMemoryInfo = memory_info
    return mod


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_nvml_reads_the_gpu_and_initialises_once(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml(name=b"NVIDIA H100")  # old pynvml answers bytes
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    probe = NvmlProbe(1)
    assert probe.describe() == "nvml GPU 1"
    first = await probe.memory()
    assert first == GpuMemory(total=80 * GiB, free=70 * GiB, source="nvml GPU 1 (NVIDIA H100)")
    assert await probe.memory() == first
    assert mod.calls == ["init", "handle 1", "memory h1", "memory h1"]
    assert probe.describe() == "nvml GPU 1 (NVIDIA H100)"


async def test_nvml_without_the_module_is_unknown_and_says_so_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import then raises ImportError
    probe = NvmlProbe()
    assert await probe.memory() is None
    assert await probe.memory() is None
    [message] = warnings(caplog)
    assert "nvml GPU 0" in message and "nvidia-ml-py is not installed" in message


async def test_nvml_error_is_unknown_logged_once_and_retried(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    mod = fake_pynvml(init_error="Driver Not Loaded")
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    probe = NvmlProbe()
    assert await probe.memory() is None
    assert await probe.memory() is None
    [message] = warnings(caplog)
    assert "NVMLError: Driver Not Loaded" in message
    # The driver came back: the next call initialises again and reads.
    monkeypatch.setattr(mod, "nvmlInit", lambda: None)
    reading = await probe.memory()
    assert reading is not None and reading.free == 70 * GiB
    assert mod.calls == ["init", "init", "handle 0", "memory h0"]


def gpu_lost(h: str) -> Any:
    raise NVMLError("GPU is lost")


async def test_nvml_error_after_init_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml()
    mod.nvmlDeviceGetMemoryInfo = gpu_lost
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    assert await NvmlProbe().memory() is None


# -- SliceProbe -----------------------------------------------------------------


class FakeSystemd:
    def __init__(self, control_group: str = "/vllm.slice", memory: int | None = 0,
                 error: Exception | None = None) -> None:
        self.cgroup = control_group
        self.memory = memory
        self.error = error
        self.asked: list[str] = []

    async def control_group(self, unit: str) -> str:
        self.asked.append(unit)
        if self.error:
            raise self.error
        return self.cgroup

    async def memory_current(self, unit: str) -> int | None:
        self.asked.append(unit)
        return self.memory


def slice_probe(sd: FakeSystemd, total: int = 10 * GiB) -> SliceProbe:
    return SliceProbe(cast(Systemd, sd), "vllm.slice", total)


async def test_slice_probe_takes_memory_current_from_the_budget() -> None:
    sd = FakeSystemd(memory=400 * MiB)
    probe = slice_probe(sd)
    assert probe.describe() == "fake GPU: RAM of vllm.slice, a budget of 10 GiB"
    assert await probe.memory() == GpuMemory(10 * GiB, 10 * GiB - 400 * MiB, "fake GPU: RAM of vllm.slice")
    assert sd.asked == ["vllm.slice", "vllm.slice"]


async def test_slice_probe_without_the_slice_has_all_free() -> None:
    reading = await slice_probe(FakeSystemd(control_group="", memory=None)).memory()
    assert reading is not None and reading.free == reading.total == 10 * GiB


async def test_slice_probe_falls_back_to_the_rss_of_the_cgroup(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def rss(control_group: str) -> int:
        seen.append(control_group)
        return GiB

    monkeypatch.setattr(gpu, "cgroup_rss", rss)
    reading = await slice_probe(FakeSystemd(memory=None)).memory()
    assert reading is not None and reading.free == 9 * GiB
    assert seen == ["/vllm.slice"]


async def test_slice_probe_unknown_when_nothing_measures(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(gpu, "cgroup_rss", lambda control_group: None)
    probe = slice_probe(FakeSystemd(memory=None))
    assert await probe.memory() is None
    assert await probe.memory() is None
    [message] = warnings(caplog)
    assert "fake GPU vllm.slice" in message and "MemoryCurrent" in message


async def test_slice_probe_bus_error_is_unknown_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    sd = FakeSystemd(error=SystemdError("Get", "org.freedesktop.DBus.Error.AccessDenied", "no"))
    probe = slice_probe(sd)
    assert await probe.memory() is None
    sd.error = ConnectionResetError("bus closed")
    assert await probe.memory() is None
    [message] = warnings(caplog)
    assert "AccessDenied" in message
    # It works again: a reading, and a later failure is told again.
    sd.error = None
    assert await probe.memory() is not None
    sd.error = ConnectionResetError("bus closed")
    assert await probe.memory() is None
    assert len(warnings(caplog)) == 2


# -- per-process readings and one probe per GPU --------------------------------


async def test_nvml_lists_what_each_process_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml()
    mod.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=10, usedGpuMemory=2 * GiB),
        types.SimpleNamespace(pid=11, usedGpuMemory=None),  # NVML cannot tell
        types.SimpleNamespace(pid=10, usedGpuMemory=GiB),  # a second context of the same process
    ]
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    probe = NvmlProbe(1)
    assert await probe.processes() == {10: 3 * GiB}
    assert mod.calls[:2] == ["init", "handle 1"]


async def test_nvml_process_errors_are_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml()
    mod.nvmlDeviceGetComputeRunningProcesses = gpu_lost
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    assert await NvmlProbe().processes() is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    probe = NvmlProbe()
    assert await probe.processes() is None and await probe.memory() is None


def test_one_probe_per_gpu() -> None:
    sd = cast(Systemd, FakeSystemd())
    fake = gpu.probes_for([("g0.slice", GiB), ("g1.slice", 2 * GiB)], [0], sd, nvml=True)
    assert {i: (p.slice, p.total) for i, p in fake.items() if isinstance(p, SliceProbe)} == {
        0: ("g0.slice", GiB), 1: ("g1.slice", 2 * GiB)}
    real = gpu.probes_for([], [1, 0, 1], sd, nvml=True)
    assert {i: p.index for i, p in real.items() if isinstance(p, NvmlProbe)} == {0: 0, 1: 1}
    assert gpu.probes_for([], [0], sd, nvml=False) == {}
