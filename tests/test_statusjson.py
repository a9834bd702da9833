"""The status schema: one engine's fields at the top level, several summed
up, the same keys from the shim and from systemd, and the rounding."""

from __future__ import annotations

from dataclasses import replace

from shim.statusjson import (
    STATUS_KEYS,
    EngineOnGpu,
    EngineStatus,
    GatewayProcess,
    gateway_json,
    without_shim_json,
)

MAIN = EngineStatus(state="ready", state_since=1_800_000_000.12345, idle_s=41.96, in_flight=0, waiting=0,
                    engine="main", unit="vllm.service", main_pid=4242, port=8100, models=("m",),
                    stop_after_s=600.0, sleep_after_s=None, sleep_level=1, sleep_enabled=False,
                    last_cold_start_s=12.34567)
ON_GPU = EngineOnGpu(expected_start_s=12.3, memory_bytes=None, pinned=False, draining=False,
                     last_memory_check=None, gpus=(0,), measured_memory={})
PROCESS = GatewayProcess(77, 300.04)
FLEET: dict[str, object] = {"holds": {}, "swaps": 0, "gpu": None, "gpus": {}, "held_gpus": {}}


def test_one_engine_has_its_fields_at_the_top_level_and_under_engines() -> None:
    status = gateway_json({"main": (MAIN, ON_GPU)}, summary=None, in_flight=0, fleet=FLEET, process=PROCESS)
    assert set(STATUS_KEYS) <= set(status)
    engines = status["engines"]
    assert isinstance(engines, dict)
    assert status["state"] == engines["main"]["state"] == "ready"
    assert status["models"] == ["m"] and status["gpus"] == {} and engines["main"]["gpus"] == [0]
    assert status["gateway_pid"] == 77 and status["gateway_uptime_s"] == 300.0
    # rounded as a person reads them
    assert status["state_since"] == 1_800_000_000.123 and status["idle_s"] == 42.0
    assert status["last_cold_start_s"] == 12.346


def test_several_engines_are_summed_up() -> None:
    other = replace(MAIN, engine="coder", state="sleeping", waiting=2)
    status = gateway_json({"main": (MAIN, ON_GPU), "coder": (other, ON_GPU)}, summary="ready", in_flight=3,
                          fleet=FLEET, process=PROCESS)
    assert (status["state"], status["in_flight"], status["waiting"]) == ("ready", 3, 2)
    assert "engine" not in status
    engines = status["engines"]
    assert isinstance(engines, dict) and engines["coder"]["state"] == "sleeping"


def test_without_the_shim_the_keys_are_the_same() -> None:
    status = without_shim_json(MAIN, GatewayProcess(None, None))
    assert tuple(status) == STATUS_KEYS
