"""Which engines must make room so that another fits on its GPUs. Pure logic.

The fleet asks `plan` whenever a request waits for an engine that holds no
GPU memory (stopped or asleep). An engine occupies one or more GPUs (its
`gpus`) and needs its memory on each of them; only engines that share a GPU
with it are in its way. The answer is one of:

- `Fits`: start or wake it now;
- `Evict`: put these engines to sleep or stop them first (least recently
  used first; pinned engines never);
- `Wait`: an engine that must go was swapped in moments ago and is in use;
  it serves at least `min_residency_s`, so that alternating requests for two
  models that do not fit together swap in batches, not at every request;
- `Refuse`: it cannot fit even with every evictable engine gone (other
  programs or pinned engines hold the memory): answer at once, naming the
  GPU and the figures, instead of letting vLLM fail after a minute. While
  an engine there is still taking its memory, the live reading is not final
  yet: `Wait` a moment and plan again instead.

A sleeping engine still holds memory (vLLM keeps its CUDA context and
graphs): once measured (`asleep_holds`) it is counted, and an engine whose
sleep would not free enough is stopped instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .gpu import format_bytes

GIB = 2**30
# While an engine on the GPU is still taking its memory (starting, waking),
# a short reading is not final: plan again this much later.
LOADING_RECHECK_S = 1.0


@dataclass(frozen=True)
class EngineView:
    name: str
    need: int | None  # GPU memory awake on each of its GPUs, bytes; None: unknown, so it runs alone
    pinned: bool = False
    awake: bool = False  # holds its memory (or is admitted to take it)
    loading: bool = False  # awake but still taking its memory (starting, waking)
    asleep: bool = False  # sleeping: holds a little (its CUDA context)
    in_use: bool = False  # requests in flight or just finished
    awake_since: float = 0.0  # when it last became ready (trio time)
    last_used: float = 0.0
    can_sleep: bool = False
    gpus: tuple[int, ...] = (0,)
    # what it holds on each of its GPUs while asleep, once measured; None: unknown
    asleep_holds: int | None = None


@dataclass(frozen=True)
class Device:
    total: int | None  # what the gateway may plan with; None: unknown
    free: int | None = None  # measured now; None without a probe


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
    total: int | None = None,
    free: int | None = None,
    devices: Mapping[int, Device] | None = None,
    now: float,
    min_residency_s: float,
) -> Decision:
    """Decide for `target` (not awake) against the other engines.

    `devices`: each GPU's figures by index; without it, one GPU 0 of `total`
    (the GPU memory the gateway may plan with, None when unknown) and `free`
    (measured now, None without a probe).
    """
    gpus = devices if devices is not None else {0: Device(total, free)}
    sharing = [e for e in others if set(e.gpus) & set(target.gpus)]
    awake = [e for e in sharing if e.awake]
    need = target.need
    if need is None or any(_device(gpus, d).total is None for d in target.gpus):
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
        victims = [(e, "sleep" if e.can_sleep else "stop") for e in must_go]
        return _evict(victims, target, "its memory need is not known, so it runs alone", now, min_residency_s)
    return _make_room(target, need, sharing, gpus, now, min_residency_s)


class _Room:
    """The figures of one GPU for one plan; `gain` grows as victims are chosen."""

    def __init__(self, index: int, device: Device, target: EngineView, need: int,
                 sharing: Sequence[EngineView]) -> None:
        assert device.total is not None
        self.index, self.total, self.free = index, device.total, device.free
        self.awake = [e for e in sharing if e.awake and index in e.gpus]
        self.sleeping = [e for e in sharing if e.asleep and index in e.gpus]
        self.budget = (self.total - sum(_held(e, self.total) for e in self.awake)
                       - sum(e.asleep_holds or 0 for e in self.sleeping))
        self.available = self.budget
        short = need - self.budget
        if self.free is not None:
            # engines still loading have not taken all of their memory yet; a
            # sleeping target already holds what it kept
            loading = sum(e.need or 0 for e in self.awake if e.loading)
            kept = (target.asleep_holds or 0) if target.asleep else 0
            self.available = min(self.budget, self.free - loading + kept)
            short = max(short, need - kept - (self.free - loading))
        self.short = short
        self.gain = 0

    @property
    def missing(self) -> int:
        return self.short - self.gain


def _device(gpus: Mapping[int, Device], index: int) -> Device:
    return gpus.get(index, Device(None))


def _held(e: EngineView, total: int) -> int:
    return e.need if e.need is not None else total


def _make_room(
    target: EngineView, need: int, sharing: Sequence[EngineView], gpus: Mapping[int, Device],
    now: float, min_residency_s: float,
) -> Decision:
    rooms = [_Room(d, _device(gpus, d), target, need, sharing) for d in target.gpus]
    if all(r.missing <= 0 for r in rooms):
        return Fits()
    chosen: dict[str, tuple[EngineView, str]] = {}

    def take(e: EngineView, action: str, gain: int) -> None:
        chosen[e.name] = (e, action)
        for r in rooms:
            if r.index in e.gpus:
                r.gain += gain

    def helps(e: EngineView) -> bool:
        return any(r.missing > 0 and r.index in e.gpus for r in rooms)

    # least recently used first: what sleep frees (all but what it keeps), or a stop frees
    for e in sorted((e for e in sharing if e.awake and not e.pinned), key=lambda e: e.last_used):
        if helps(e):
            total = min(r.total for r in rooms if r.index in e.gpus)
            if e.can_sleep:
                take(e, "sleep", _held(e, total) - (e.asleep_holds or 0))
            else:
                take(e, "stop", _held(e, total))
    # sleeping would keep too much: stop instead
    for e, action in list(chosen.values()):
        if action == "sleep" and e.asleep_holds and helps(e):
            take(e, "stop", e.asleep_holds)
    # engines asleep with a known hold; then those whose hold is unknown, when
    # the live reading is what is short
    for e in sorted((e for e in sharing if e.asleep and not e.pinned), key=lambda e: e.last_used):
        if e.asleep_holds and helps(e):
            take(e, "stop", e.asleep_holds)
    for r in rooms:
        unknown = [e for e in r.sleeping if e.asleep_holds is None and not e.pinned]
        if r.missing > 0 and unknown and r.free is not None and r.budget + r.gain >= need:
            for e in sorted(unknown, key=lambda e: e.last_used):
                take(e, "stop", 0)
            r.gain = max(r.gain, r.short)  # measured again once they are gone
    for r in rooms:
        if r.missing > 0:
            loading = [e.name for e in r.awake if e.loading]
            if loading and r.free is not None:
                # the live reading counts part of what they take, and the plan
                # all of it: look again once they hold all of it
                return Wait(now + LOADING_RECHECK_S, f"{', '.join(map(repr, loading))} still taking "
                            f"memory on GPU {r.index}")
            return Refuse(_no_room(target, need, r))
    worst = max(rooms, key=lambda r: r.short)
    why = (f"{target.name!r} needs {format_bytes(need)} on GPU {worst.index}; "
           f"{format_bytes(max(0, worst.available))} is available")
    return _evict(list(chosen.values()), target, why, now, min_residency_s)


def _evict(
    victims: Sequence[tuple[EngineView, str]], target: EngineView, why: str, now: float,
    min_residency_s: float,
) -> Decision:
    # `now < since + residency`, the very sum that the Wait names: at that
    # instant the victim is no longer protected (now - since < residency can
    # still hold there, by rounding, and the caller would wait again at once)
    protected = [v for v, _ in victims if v.awake and v.in_use and now < v.awake_since + min_residency_s]
    if protected:
        until = max(v.awake_since + min_residency_s for v in protected)
        names = ", ".join(repr(v.name) for v in protected)
        return Wait(until, f"{names} swapped in less than {min_residency_s:g} s ago and in use")
    return Evict(
        tuple((v.name, "stop" if v.asleep else action) for v, action in victims),
        f"to make room for {target.name!r}: {why}",
    )


def _no_room(target: EngineView, need: int, r: _Room) -> str:
    ours = sum(_held(e, r.total) for e in r.awake) + sum(e.asleep_holds or 0 for e in r.sleeping)
    pinned = [e for e in r.awake if e.pinned]
    parts = [f"vllm-gateway: not enough GPU memory for the engine {target.name!r} on GPU {r.index}: "
             f"it needs {format_bytes(need)}"]
    if r.free is not None:
        parts.append(f"{format_bytes(r.free)} of {format_bytes(r.total)} is free")
        others = r.total - r.free - ours
        if others > 0.05 * r.total:
            parts.append(f"other programs hold about {format_bytes(others)}")
    else:
        parts.append(f"the gateway may use {format_bytes(r.total)} (gateway.gpu_memory)")
    if pinned:
        held = sum(e.need or 0 for e in pinned)
        parts.append(f"pinned engines ({', '.join(e.name for e in pinned)}) hold {format_bytes(held)}")
    asleep = [e for e in r.sleeping if e.asleep_holds]
    if asleep:
        held = sum(e.asleep_holds or 0 for e in asleep)
        names = ", ".join(e.name for e in asleep)
        parts.append(f"sleeping engines ({names}) still hold {format_bytes(held)}")
    return "; ".join(parts)
