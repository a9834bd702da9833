"""Which engines must make room so that another fits on the GPU. Pure logic.

The fleet asks `plan` whenever a request waits for an engine that holds no
GPU memory (stopped or asleep). The answer is one of:

- `Fits`: start or wake it now;
- `Evict`: put these engines to sleep or stop them first (least recently
  used first; pinned engines never);
- `Wait`: an engine that must go was swapped in moments ago and is in use;
  it serves at least `min_residency_s`, so that alternating requests for two
  models that do not fit together swap in batches, not at every request;
- `Refuse`: it cannot fit even with every evictable engine gone (other
  programs or pinned engines hold the memory): answer at once, naming the
  figures, instead of letting vLLM fail after a minute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .gpu import format_bytes

GIB = 2**30


@dataclass(frozen=True)
class EngineView:
    name: str
    need: int | None  # GPU memory awake, bytes; None: unknown, so it runs alone
    pinned: bool = False
    awake: bool = False  # holds its memory (or is admitted to take it)
    loading: bool = False  # awake but still taking its memory (starting, waking)
    asleep: bool = False  # sleeping: holds a little (its CUDA context)
    in_use: bool = False  # requests in flight or just finished
    awake_since: float = 0.0  # when it last became ready (trio time)
    last_used: float = 0.0
    can_sleep: bool = False


@dataclass(frozen=True)
class Fits:
    pass


@dataclass(frozen=True)
class Evict:
    victims: tuple[tuple[str, str], ...]  # (engine, "sleep" | "stop"), in order
    reason: str


@dataclass(frozen=True)
class Wait:
    until: float
    reason: str


@dataclass(frozen=True)
class Refuse:
    message: str


Decision = Fits | Evict | Wait | Refuse


def plan(
    target: EngineView,
    others: Sequence[EngineView],
    *,
    total: int | None,
    free: int | None,
    now: float,
    min_residency_s: float,
) -> Decision:
    """Decide for `target` (not awake) against the other engines.

    `total`: the GPU memory the gateway may plan with, None when unknown;
    `free`: the GPU's free memory measured now (NVML), None without a probe.
    """
    awake = [e for e in others if e.awake]
    need = target.need
    if need is None or total is None:
        # Without figures, an engine of unknown size runs alone, and so does
        # any engine beside one of unknown size.
        must_go = awake if need is None else [e for e in awake if e.need is None]
        pinned = [e.name for e in must_go if e.pinned]
        if pinned:
            return Refuse(
                f"vllm-gateway: the engine {target.name!r} cannot start beside the pinned engine "
                f"{', '.join(map(repr, pinned))}: set `memory` of both engines and gateway.gpu_memory "
                "(or install NVML) so that the gateway can tell whether they fit together"
            )
        if not must_go:
            return Fits()
        return _evict(must_go, target, "its memory need is not known, so it runs alone", now, min_residency_s)

    budget = total - sum(e.need if e.need is not None else total for e in awake)
    available = budget
    if free is not None:
        # engines still loading have not taken all of their memory yet
        available = min(budget, free - sum(e.need or 0 for e in awake if e.loading))
    if available >= need:
        return Fits()
    short = need - available
    chosen: list[EngineView] = []
    gain = 0
    for e in sorted((e for e in awake if not e.pinned), key=lambda e: e.last_used):
        if gain >= short:
            break
        chosen.append(e)
        gain += e.need if e.need is not None else total
    if gain < short:
        sleepers = [e for e in others if e.asleep and not e.pinned]
        if free is not None and sleepers and budget + gain >= need:
            # what the sleeping engines still hold is unknown: stop them too,
            # then measure again
            chosen += sorted(sleepers, key=lambda e: e.last_used)
        else:
            return Refuse(_no_room(target, need, awake, total, free))
    why = f"{target.name!r} needs {format_bytes(need)}; {format_bytes(max(0, available))} is available"
    return _evict(chosen, target, why, now, min_residency_s)


def _evict(
    victims: Sequence[EngineView], target: EngineView, why: str, now: float, min_residency_s: float
) -> Decision:
    protected = [v for v in victims if v.awake and v.in_use and now - v.awake_since < min_residency_s]
    if protected:
        until = max(v.awake_since + min_residency_s for v in protected)
        names = ", ".join(repr(v.name) for v in protected)
        return Wait(until, f"{names} swapped in less than {min_residency_s:g} s ago and in use")
    return Evict(
        tuple((v.name, "sleep" if v.can_sleep and not v.asleep else "stop") for v in victims),
        f"to make room for {target.name!r}: {why}",
    )


def _no_room(
    target: EngineView, need: int, awake: Sequence[EngineView], total: int, free: int | None
) -> str:
    ours = sum(e.need or 0 for e in awake)
    pinned = [e for e in awake if e.pinned]
    parts = [f"vllm-gateway: not enough GPU memory for the engine {target.name!r}: "
             f"it needs {format_bytes(need)}"]
    if free is not None:
        parts.append(f"{format_bytes(free)} of {format_bytes(total)} is free")
        others = total - free - ours
        if others > 0.05 * total:
            parts.append(f"other programs hold about {format_bytes(others)}")
    else:
        parts.append(f"the gateway may use {format_bytes(total)} (gateway.gpu_memory)")
    if pinned:
        held = sum(e.need or 0 for e in pinned)
        parts.append(f"pinned engines ({', '.join(e.name for e in pinned)}) hold {format_bytes(held)}")
    return "; ".join(parts)
