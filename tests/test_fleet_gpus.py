"""The fleet with several GPUs, without running it: holds per GPU, what it
plans with (measured before configured), and what status and metrics show."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest

from shim import yielding
from shim.config import parse
from shim.engine import Engine
from shim.errors import GpuYielded
from shim.fleet import Fleet
from shim.gpu import GpuMemory, GpuProbe
from shim.gpustatus import gpus_json, gpus_live, held_live
from shim.lifecycle import State
from shim.measured import MeasuredStore
from shim.meter import Measurements
from shim.metrics import EngineLive, Live, Metrics, number
from shim.systemd import Systemd

MiB = 1024**2
CMD = ["vllm", "serve", "m"]


class Probe:
    def __init__(self, total: int, free: int) -> None:
        self.reading = GpuMemory(total, free, "test GPU")

    async def memory(self) -> GpuMemory | None:
        return self.reading

    def describe(self) -> str:
        return "test GPU"


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fleet:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    cfg = parse({"engines": {
        "chat": {"command": [*CMD, "chat"], "models": ["chat"], "gpus": [0], "memory": "300MiB"},
        "whisper": {"command": [*CMD, "whisper"], "models": ["w"], "gpus": [1], "memory": "200MiB"},
        "split": {"command": [*CMD, "split"], "models": ["s"], "gpus": [0, 1]},
    }})
    engines = {name: Engine(e, cast(Systemd, None)) for name, e in cfg.engines.items()}
    probes = cast(dict[int, GpuProbe], {0: Probe(1000 * MiB, 900 * MiB), 1: Probe(500 * MiB, 400 * MiB)})
    return Fleet(cfg, engines, probes, Measurements(None, MeasuredStore(tmp_path / "m.json")))


async def test_a_hold_of_one_gpu_takes_only_the_engines_on_it(fleet: Fleet) -> None:
    yielding.holds_dir().mkdir(parents=True)
    (yielding.holds_dir() / "whisper.service").write_text(yielding.hold_text(1.0, (1,)))
    assert await fleet.hold("whisper.service", 1.0, (1,))  # no engine holds memory yet
    chat, whisper, split = (fleet.engines[n] for n in ("chat", "whisper", "split"))
    assert fleet._holders(chat) == [] and fleet._holders(whisper) == ["whisper.service"]
    assert fleet._holders(split) == ["whisper.service"]
    with pytest.raises(GpuYielded) as info:
        await fleet.gate(whisper)
    assert "GPU 1 of the engine 'whisper' is yielded to other work (whisper.service)" in str(info.value)
    status = gpus_json(fleet)
    assert status["held_gpus"] == {"whisper.service": [1]}
    gpus = cast(dict[str, dict[str, object]], status["gpus"])
    assert gpus["1"]["held_by"] == ["whisper.service"] and gpus["0"]["held_by"] == []
    assert gpus["0"]["engines"] == ["chat", "split"] and gpus["1"]["engines"] == ["whisper", "split"]
    fleet.release("whisper.service")
    assert fleet._holders(whisper) == [] and gpus_json(fleet)["held_gpus"] == {}


async def test_a_hold_of_every_gpu_takes_every_engine(fleet: Fleet) -> None:
    assert await fleet.hold("game", 1.0)
    assert all(fleet._holders(e) == ["game"] for e in fleet.engines.values())
    with pytest.raises(GpuYielded) as info:
        await fleet.gate(fleet.engines["chat"])
    assert "the GPU is yielded to other work (game)" in str(info.value)


async def test_plans_use_each_gpu_and_measured_figures_once_known(fleet: Fleet) -> None:
    chat, split = fleet.engines["chat"], fleet.engines["split"]
    devices = await fleet._devices(split)
    assert {d: (v.total, v.free) for d, v in devices.items()} == {
        0: (1000 * MiB, 900 * MiB), 1: (500 * MiB, 400 * MiB)}
    # no `memory`: vLLM's 0.9 of its smallest GPU
    assert fleet.need(split) == int(500 * MiB * 0.9)
    assert fleet.need(chat) == 300 * MiB
    fleet.measured.record(chat.cfg, True, {0: 350 * MiB})
    fleet.measured.record(chat.cfg, False, {0: 80 * MiB})
    assert fleet.need(chat) == int(350 * MiB * 1.1)
    view = fleet._view(chat)
    assert view.gpus == (0,) and view.need == int(350 * MiB * 1.1)
    assert view.asleep_holds is None  # it cannot sleep (no sleep_after): the figure does not apply
    assert gpus_live(fleet)[1].free == 400 * MiB


async def test_metrics_show_each_gpu_and_measured_memory(fleet: Fleet) -> None:
    await fleet._devices(fleet.engines["split"])
    fleet.measured.record(fleet.engines["chat"].cfg, True, {0: 350 * MiB})
    engines = [EngineLive(e.cfg.name, State.STOPPED, 0, 0, {}) for e in fleet.engines.values()]
    live = Live(lambda: engines, lambda: gpus_live(fleet), lambda: held_live(fleet))
    text = Metrics(live).render().decode()
    assert f'vllm_gateway_gpu_memory_free_bytes{{gpu="1"}} {number(400 * MiB)}' in text
    assert f'vllm_gateway_gpu_memory_total_bytes{{gpu="0"}} {number(1000 * MiB)}' in text
    assert (f'vllm_gateway_engine_gpu_memory_bytes{{engine="chat",gpu="0",measure="awake"}} '
            f"{number(350 * MiB)}") in text
    assert 'engine="chat",gpu="0",measure="now"' in text


def test_the_status_table_shows_the_gpus_and_measured_memory() -> None:
    from shim.commands import gpu_rows
    from shim.statusjson import EngineOnGpu
    on_gpu = EngineOnGpu(expected_start_s=None, memory_bytes=None, pinned=False, draining=False,
                         last_memory_check=None, gpus=(0, 1), measured_memory={
        "awake": {"0": 350 * MiB, "1": 340 * MiB}, "asleep": {"1": {"0": 80 * MiB}}, "now": None})
    assert gpu_rows(on_gpu, 1) == [
        ("gpus", "0, 1"),
        ("measured", "now -; awake 350 MiB on GPU 0, 340 MiB on GPU 1; asleep 80 MiB on GPU 0"),
    ]
    assert gpu_rows(None, 1) == []  # an older shim's status
