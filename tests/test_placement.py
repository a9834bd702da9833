"""The swap plan: who must make room, in which order, and when to refuse."""

from __future__ import annotations

from dataclasses import replace

from shim.placement import GIB, Device, EngineView, Evict, Fits, Refuse, Wait, plan

T = EngineView("new", need=8 * GIB)


def awake(name: str, need: int | None = 8 * GIB, **kw: object) -> EngineView:
    return replace(EngineView(name, need, awake=True, can_sleep=True), **kw)  # type: ignore[arg-type]


def decide(target: EngineView, *others: EngineView, total: int | None = 24 * GIB,
           free: int | None = None, now: float = 100.0) -> object:
    return plan(target, others, total=total, free=free, now=now, min_residency_s=10.0)


def test_fits_beside_the_others() -> None:
    assert decide(T, awake("a"), awake("b")) == Fits()


def test_evicts_the_least_recently_used_first_and_only_as_many_as_needed() -> None:
    d = decide(T, awake("a", last_used=50), awake("b", last_used=10), awake("c", last_used=30))
    assert isinstance(d, Evict) and d.victims == (("b", "sleep"),)
    big = replace(T, need=16 * GIB)
    d = decide(big, awake("a", last_used=50), awake("b", last_used=10), awake("c", last_used=30))
    assert isinstance(d, Evict) and [v for v, _ in d.victims] == ["b", "c"]


def test_engines_that_cannot_sleep_are_stopped() -> None:
    d = decide(T, awake("a", can_sleep=False), awake("b"), awake("c", last_used=99))
    assert isinstance(d, Evict) and d.victims == (("a", "stop"),)


def test_pinned_engines_are_never_evicted() -> None:
    d = decide(T, awake("a", pinned=True), awake("b", last_used=90), awake("c", pinned=True))
    assert isinstance(d, Evict) and d.victims == (("b", "sleep"),)
    d = decide(replace(T, need=16 * GIB), awake("a", pinned=True), awake("b", pinned=True))
    assert isinstance(d, Refuse)
    assert "pinned engines (a, b) hold 16 GiB" in d.message and "needs 16 GiB" in d.message


def test_a_busy_gpu_is_refused_at_once_naming_free_and_needed() -> None:
    d = decide(T, total=24 * GIB, free=3 * GIB)
    assert isinstance(d, Refuse)
    assert "needs 8 GiB" in d.message and "3 GiB of 24 GiB is free" in d.message
    assert "other programs hold about 21 GiB" in d.message


def test_live_free_memory_bounds_the_plan() -> None:
    # the budget says it fits, but another program holds memory: evict ours
    d = decide(T, awake("a"), total=24 * GIB, free=4 * GIB)
    assert isinstance(d, Evict) and d.victims == (("a", "sleep"),)


def test_engines_still_loading_count_as_holding_their_memory() -> None:
    d = decide(T, awake("a", loading=True), total=24 * GIB, free=12 * GIB)
    assert isinstance(d, Evict)
    assert decide(T, awake("a", loading=False), total=24 * GIB, free=12 * GIB) == Fits()


def test_sleepers_are_stopped_when_only_the_live_reading_is_short() -> None:
    sleeper = EngineView("s", 8 * GIB, asleep=True, can_sleep=True)
    d = decide(T, sleeper, total=24 * GIB, free=7 * GIB)
    assert isinstance(d, Evict) and d.victims == (("s", "stop"),)
    # without a live reading nothing says a sleeper is in the way
    assert decide(T, sleeper, total=24 * GIB) == Fits()


def test_a_victim_swapped_in_moments_ago_and_in_use_is_kept_for_min_residency() -> None:
    d = decide(replace(T, need=20 * GIB), awake("a", awake_since=95.0, in_use=True), now=100.0)
    assert isinstance(d, Wait) and d.until == 105.0
    # idle, or resident long enough: it goes
    d = decide(replace(T, need=20 * GIB), awake("a", awake_since=95.0, in_use=False), now=100.0)
    assert isinstance(d, Evict)
    d = decide(replace(T, need=20 * GIB), awake("a", awake_since=80.0, in_use=True), now=100.0)
    assert isinstance(d, Evict)


def test_the_wait_for_min_residency_ends_at_the_instant_it_names() -> None:
    # whatever the times, deciding again at `until` evicts: no second wait
    for k in range(2000):
        since = k * 0.0137  # about 4 % of these times used to round the wrong way
        victim = awake("a", awake_since=since, in_use=True)
        d = decide(replace(T, need=20 * GIB), victim, now=since)
        assert isinstance(d, Wait), since
        again = decide(replace(T, need=20 * GIB), victim, now=d.until)
        assert isinstance(again, Evict), (since, d.until)


def test_unknown_sizes_run_alone() -> None:
    alone = EngineView("new", need=None)
    d = decide(alone, awake("a", None), awake("b", None, can_sleep=False), total=None)
    assert isinstance(d, Evict) and d.victims == (("a", "sleep"), ("b", "stop"))
    assert decide(alone, total=None) == Fits()
    # a sized engine beside an unsized one: the unsized one goes
    d = decide(T, awake("a", None), awake("b"), total=None)
    assert isinstance(d, Evict) and d.victims == (("a", "sleep"),)
    assert decide(T, awake("b"), total=None) == Fits()


def test_an_unsized_engine_never_evicts_a_pinned_one() -> None:
    d = decide(EngineView("new", need=None), awake("a", None, pinned=True), total=None)
    assert isinstance(d, Refuse) and "pinned engine 'a'" in d.message


# ---- several GPUs ----

TWO = {0: Device(24 * GIB), 1: Device(24 * GIB)}


def on(gpus: tuple[int, ...], name: str, need: int | None = 16 * GIB, **kw: object) -> EngineView:
    return awake(name, need, gpus=gpus, **kw)


def decide_on(target: EngineView, *others: EngineView, devices: dict[int, Device] | None = None,
              now: float = 100.0) -> object:
    return plan(target, others, devices=TWO if devices is None else devices, now=now, min_residency_s=10.0)


def test_engines_on_other_gpus_are_not_in_the_way() -> None:
    new = EngineView("new", 16 * GIB, gpus=(1,))
    assert decide_on(new, on((0,), "a")) == Fits()
    d = decide_on(new, on((0,), "a", last_used=1), on((1,), "b", last_used=50))
    assert isinstance(d, Evict) and d.victims == (("b", "sleep"),)  # a is older but elsewhere


def test_an_engine_on_two_gpus_needs_room_on_each() -> None:
    split = EngineView("split", 16 * GIB, gpus=(0, 1))
    d = decide_on(split, on((0,), "a", last_used=5), on((1,), "b", last_used=9),
                  on((1,), "c", 4 * GIB, last_used=20))
    assert isinstance(d, Evict) and d.victims == (("a", "sleep"), ("b", "sleep"))
    # one victim on both GPUs is enough
    d = decide_on(split, on((0, 1), "big", last_used=5), on((0,), "small", 4 * GIB, last_used=9))
    assert isinstance(d, Evict) and d.victims == (("big", "sleep"),)


def test_a_busy_gpu_is_refused_naming_the_device() -> None:
    devices = {0: Device(24 * GIB, 20 * GIB), 1: Device(24 * GIB, 3 * GIB)}
    d = decide_on(EngineView("new", 8 * GIB, gpus=(0, 1)), devices=devices)
    assert isinstance(d, Refuse)
    assert "for the engine 'new' on GPU 1: it needs 8 GiB; 3 GiB of 24 GiB is free" in d.message
    assert decide_on(EngineView("new", 8 * GIB, gpus=(0,)), devices=devices) == Fits()


def test_a_gpu_without_figures_makes_the_engine_run_alone_there() -> None:
    devices = {0: Device(24 * GIB)}  # GPU 1 has no figures
    d = decide_on(EngineView("new", 8 * GIB, gpus=(1,)), on((1,), "a", None), on((0,), "b", None),
                  devices=devices)
    assert isinstance(d, Evict) and d.victims == (("a", "sleep"),)


def test_a_sleeping_engine_that_holds_memory_is_counted() -> None:
    sleeper = EngineView("s", 16 * GIB, asleep=True, can_sleep=True, asleep_holds=6 * GIB, last_used=1)
    # 24 - 6 held asleep = 18 >= 16: fits, with no live reading at all
    assert decide(replace(T, need=16 * GIB), sleeper) == Fits()
    # 24 - 6 < 20: the sleeper is stopped, by its measured hold, without a live reading
    d = decide(replace(T, need=20 * GIB), sleeper)
    assert isinstance(d, Evict) and d.victims == (("s", "stop"),)
    d = decide(replace(T, need=20 * GIB), replace(sleeper, pinned=True))
    assert isinstance(d, Refuse) and "sleeping engines (s) still hold 6 GiB" in d.message


def test_an_engine_whose_sleep_keeps_too_much_is_stopped_instead() -> None:
    a = awake("a", 16 * GIB, asleep_holds=6 * GIB)
    # 4 GiB are free; sleeping a frees 10 more: enough for 14
    d = decide(replace(T, need=14 * GIB), a, total=20 * GIB)
    assert isinstance(d, Evict) and d.victims == (("a", "sleep"),)
    # but not for 16: a is stopped
    d = decide(replace(T, need=16 * GIB), a, total=20 * GIB)
    assert isinstance(d, Evict) and d.victims == (("a", "stop"),)


def test_a_sleeping_target_needs_only_what_it_does_not_keep() -> None:
    me = replace(T, need=10 * GIB, asleep=True, asleep_holds=4 * GIB)
    assert decide(me, total=24 * GIB, free=6 * GIB) == Fits()
    assert isinstance(decide(me, total=24 * GIB, free=5 * GIB), Refuse)


def test_a_short_reading_while_an_engine_loads_is_looked_at_again_not_refused() -> None:
    # a wakes: the reading shows part of its memory taken, the plan counts all of it
    d = decide(replace(T, need=12 * GIB), awake("a", 10 * GIB, loading=True, can_sleep=False),
               total=24 * GIB, free=1 * GIB, now=100.0)
    assert isinstance(d, Wait) and d.until == 101.0 and "'a' still taking memory on GPU 0" in d.reason
    # without a live reading, or once it is loaded, the answer is final
    assert isinstance(decide(replace(T, need=30 * GIB), awake("a", loading=True), total=24 * GIB), Refuse)
    d = decide(replace(T, need=12 * GIB), awake("a", 10 * GIB, can_sleep=False), total=24 * GIB,
               free=1 * GIB)
    assert isinstance(d, Refuse)
