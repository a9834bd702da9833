"""Each GPU and what each engine holds there, for /gateway/status and /metrics.

Read from the fleet (its last readings, holds and measured figures); writes
nothing. One schema for status and one for metrics, built here only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .metrics import GpuLive, HeldLive
from .yielding import affects

if TYPE_CHECKING:
    from .fleet import Fleet


def gpus_json(fleet: Fleet) -> dict[str, object]:
    """Each GPU: its last reading, its engines and who holds it; and each holder's GPUs."""
    gpus, held = gpus_and_holders(fleet)
    return {"gpus": gpus, "held_gpus": held}


def gpus_and_holders(fleet: Fleet) -> tuple[dict[str, object], dict[str, object]]:
    """`gpus_json`'s two parts: by GPU, and by holder."""
    indices = sorted({d for e in fleet.engines.values() for d in e.cfg.devices} | set(fleet.probes))
    gpus: dict[str, object] = {}
    for d in indices:
        reading = fleet.gpus.get(d)
        probe = fleet.probes.get(d)
        gpus[str(d)] = {
            "total_bytes": reading.total if reading else fleet.gpu_total(d),
            "free_bytes": reading.free if reading else None,
            "source": reading.source if reading else probe.describe() if probe else None,
            "engines": [e.cfg.name for e in fleet.engines.values() if d in e.cfg.devices],
            "held_by": sorted(h for h in fleet.holds if affects(fleet.hold_gpus.get(h), (d,))),
        }
    held: dict[str, object] = {h: None if g is None else list(g) for h, g in fleet.hold_gpus.items()
                               if h in fleet.holds}
    return gpus, held


def gpus_live(fleet: Fleet) -> list[GpuLive]:
    return [GpuLive(d, r.total if r else fleet.gpu_total(d), r.free if r else None)
            for d, r in sorted(fleet.gpus.items())]


def held_live(fleet: Fleet) -> list[HeldLive]:
    out = []
    for e in fleet.engines.values():
        known = fleet.measured.known(e.cfg)
        figures = [("now", fleet.measured.now.get(e.cfg.name, {})), ("awake", known.awake),
                   ("asleep", known.asleep.get(e.cfg.sleep_level, {}))]
        out += [HeldLive(e.cfg.name, d, measure, n) for measure, by_gpu in figures
                for d, n in sorted(by_gpu.items())]
    return out
