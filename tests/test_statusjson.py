"""The status schema: one engine's fields at the top level, several summed
up, the same keys from the shim and from systemd, the rounding, and the
JSON read back (the command line) into the same value."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from shim.statusjson import (
    STATUS_KEYS,
    EngineEntry,
    EngineOnGpu,
    EngineStatus,
    FleetStatus,
    GatewayProcess,
    GatewayStatus,
    StatusError,
    engine_view,
    parse,
    without_shim,
)

MAIN = EngineStatus(state="ready", state_since=1_800_000_000.123, idle_s=42.0, in_flight=0, waiting=0,
                    engine="main", unit="vllm.service", main_pid=4242, port=8100, models=("m",),
                    stop_after_s=600.0, sleep_after_s=None, sleep_level=1, sleep_enabled=False,
                    last_cold_start_s=12.346)
ON_GPU = EngineOnGpu(expected_start_s=12.3, memory_bytes=None, pinned=False, draining=False,
                     last_memory_check=None, gpus=(0,), measured_memory={})
PROCESS = GatewayProcess(77, 300.0)
FLEET = FleetStatus(holds={}, swaps=0, gpu=None, gpus={}, held_gpus={})


def gateway(*entries: EngineEntry) -> GatewayStatus:
    return GatewayStatus({e.status.engine: e for e in entries}, FLEET, PROCESS)


def test_one_engine_has_its_fields_at_the_top_level_and_under_engines() -> None:
    unrounded = replace(MAIN, state_since=1_800_000_000.12345, idle_s=41.96, last_cold_start_s=12.34567)
    process = GatewayProcess(77, 300.04)
    status = GatewayStatus({"main": EngineEntry(unrounded, ON_GPU)}, FLEET, process).as_json()
    assert set(STATUS_KEYS) <= set(status)
    engines = status["engines"]
    assert isinstance(engines, dict)
    assert status["state"] == engines["main"]["state"] == "ready"
    assert status["models"] == ["m"] and status["gpus"] == {} and engines["main"]["gpus"] == [0]
    assert status["gateway_pid"] == 77 and status["gateway_uptime_s"] == 300.0
    # rounded as a person reads them
    assert status["state_since"] == 1_800_000_000.123 and status["idle_s"] == 42.0
    assert status["last_cold_start_s"] == 12.346
    assert "start_phase" not in status


def test_several_engines_are_summed_up() -> None:
    other = replace(MAIN, engine="coder", state="sleeping", in_flight=3, waiting=2)
    status = gateway(EngineEntry(MAIN, ON_GPU), EngineEntry(other, ON_GPU)).as_json()
    assert (status["state"], status["in_flight"], status["waiting"]) == ("ready", 3, 2)
    assert "engine" not in status
    engines = status["engines"]
    assert isinstance(engines, dict) and engines["coder"]["state"] == "sleeping"


def test_a_start_phase_shows_at_the_end_with_one_engine_and_in_its_entry() -> None:
    starting = EngineEntry(replace(MAIN, state="starting"), ON_GPU, "loading weights")
    status = gateway(starting).as_json()
    assert list(status)[-1] == "start_phase" and status["start_phase"] == "loading weights"
    several = gateway(starting, EngineEntry(replace(MAIN, engine="coder"), ON_GPU)).as_json()
    assert "start_phase" not in several
    assert several["engines"]["main"]["start_phase"] == "loading weights"  # type: ignore[index]


def test_without_the_shim_the_keys_are_the_same() -> None:
    status = without_shim(MAIN, GatewayProcess(None, None)).as_json()
    assert tuple(status) == STATUS_KEYS


FLEETS = [FLEET, FleetStatus(
    holds={"game": 1234.5}, swaps=3, gpu={"total_bytes": 2**34, "free_bytes": 2**33, "source": "nvml"},
    gpus={"0": {"total_bytes": 2**34, "free_bytes": None, "source": None, "engines": ["main"],
                "held_by": ["game"]}},
    held_gpus={"game": [0], "other": None})]
ENTRIES = [
    [EngineEntry(MAIN, ON_GPU)],
    [EngineEntry(replace(MAIN, state="starting", main_pid=None, last_error="boom", last_error_at=1.5,
                         last_error_past=True), ON_GPU, "loading weights")],
    [EngineEntry(MAIN, ON_GPU),
     EngineEntry(replace(MAIN, engine="coder", models=("c1", "c2"), state="sleeping", in_flight=2, waiting=1,
                         sleep_refused="no"),
                 replace(ON_GPU, gpus=(0, 1), memory_bytes=2**30, pinned=True, last_memory_check={"ok": True},
                         measured_memory={"awake": {"0": 5}}), "")],
]


@pytest.mark.parametrize("fleet", FLEETS)
@pytest.mark.parametrize("entries", ENTRIES)
def test_the_json_reads_back_into_the_same_status(fleet: FleetStatus, entries: list[EngineEntry]) -> None:
    status = GatewayStatus({e.status.engine: e for e in entries}, fleet, PROCESS)
    sent = json.loads(json.dumps(status.as_json()))
    assert parse(sent) == status
    assert parse(sent).as_json() == sent


def test_the_command_lines_view_is_the_status_with_the_engines_fields_on_top() -> None:
    for entries in ENTRIES:
        sent = json.loads(json.dumps(gateway(*entries).as_json()))
        for name in sent["engines"]:
            view = engine_view(parse(sent), name)
            assert view is not None
            assert view.as_json() == {**sent, **sent["engines"][name]}
            assert list(view.as_json()) == list({**sent, **sent["engines"][name]})


def test_an_older_shims_status_without_gpu_fields_and_later_fields_reads() -> None:
    sent = json.loads(json.dumps(gateway(EngineEntry(MAIN, ON_GPU)).as_json()))
    entry = {k: v for k, v in sent["engines"]["main"].items()
             if k not in ("gpus", "measured_memory", "sleep_refused", "last_error_past")}
    status = parse({**sent, "engines": {"main": entry}})
    assert status.engines["main"].on_gpu is None
    assert status.engines["main"].status == MAIN


@pytest.mark.parametrize("bad", [
    None, [], {}, {"engines": []}, {"engines": {"main": 1}},
    "status-of-one-engine-with-a-bad-field",
])
def test_anything_else_raises_our_error(bad: object) -> None:
    if bad == "status-of-one-engine-with-a-bad-field":
        sent = json.loads(json.dumps(gateway(EngineEntry(MAIN, ON_GPU)).as_json()))
        sent["engines"]["main"]["in_flight"] = "3"
        bad = sent
    with pytest.raises(StatusError):
        parse(bad)
