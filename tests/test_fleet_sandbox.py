"""Several engines on one GPU, end to end: routing by model, swapping by LRU
with pinned engines kept, the fair queue under mixed load, a busy GPU
answered at once, and `vllm-gateway yield`.

The GPU is the fake one: a budget of memory, less what the processes in a
systemd slice hold (shim/gpu.py SliceProbe). Engines are fake-vllm with a
resident ballast (`--hold-rss-mb`) that sleep frees and a wake takes back,
as vLLM does with VRAM; "other programs" are units in the same slice."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.gatewaying import Gateway, wait_until
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

SLICE = "fakegpu.slice"
HOLD_MB = 120
# fake-vllm's interpreter (~30 MiB) plus its ballast
ENGINE_MEMORY = f"{HOLD_MB + 60}MiB"
TWO_FIT = f"{2 * (HOLD_MB + 60) + 100}MiB"
ONE_FITS = f"{HOLD_MB + 60 + 100}MiB"


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    yield Gateway(sandbox)


def engine(models: list[str], *extra: str, **table: Any) -> dict[str, Any]:
    return {"models": models, "memory": ENGINE_MEMORY, "stop_after": "10m",
            "fake_args": ["--hold-rss-mb", str(HOLD_MB), "--startup-delay", "0.3", *extra], **table}


def gateway(budget: str, **extra: Any) -> dict[str, Any]:
    return {"fake_gpu": {"slice": SLICE, "memory": budget}, "min_residency": "1s", **extra}


def states(gw: Gateway) -> dict[str, str]:
    return {name: e["state"] for name, e in gw.status()["engines"].items()}


def chat(gw: Gateway, model: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    code, _, body = gw.chat(model=model, **extra)
    return code, json.loads(body)


def vllm_gateway(gw: Gateway, *args: str, timeout: float = 120) -> Any:
    return gw.sb.run([f"{gw.home}/.local/bin/vllm-gateway", *args], check=False, timeout=timeout)


def test_requests_are_routed_by_model_and_models_listed_without_a_start(gw: Gateway) -> None:
    gw.configure_engines({"a": engine(["alpha", "alpha-2"]), "b": engine(["beta"])}, gateway(TWO_FIT))
    code, _, body = gw.request("GET", "/v1/models")
    assert code == 200
    assert [m["id"] for m in json.loads(body)["data"]] == ["alpha", "alpha-2", "beta"]
    assert gw.active("vllm-a.service") != "active" and gw.active("vllm-b.service") != "active"

    code, answer = chat(gw, "alpha-2")
    assert code == 200, answer  # fake-vllm answers 404 for a model it does not serve
    assert gw.active("vllm-a.service") == "active" and gw.active("vllm-b.service") != "active"
    assert chat(gw, "beta")[0] == 200
    assert states(gw) == {"a": "ready", "b": "ready"}  # both fit
    assert gw.unit_prop("vllm-b.service", "ControlGroup").startswith(f"/{SLICE}/")

    code, answer = chat(gw, "gamma")
    assert code == 404
    assert "`gamma` does not exist; available: alpha, alpha-2, beta" in answer["error"]["message"]
    code, _, body = gw.request("POST", "/v1/chat/completions", {"messages": []})
    assert code == 400 and b"names no `model`" in body
    status = gw.unit_prop("vllm-gateway.service", "StatusText")
    assert "unit=vllm-a.service" in status and "unit=vllm-b.service" in status
    code, _, metrics = gw.request("GET", "/metrics")
    assert b'vllm_gateway_engine_state{engine="b",state="ready"} 1.0' in metrics


def test_lru_engines_make_room_and_pinned_ones_stay(gw: Gateway) -> None:
    gw.configure_engines({
        "a": engine(["alpha"], pinned=True),
        "b": engine(["beta"], sleep_after="10m"),  # can sleep: evicted by sleep
        "c": engine(["gamma"]),  # cannot: evicted by a stop
    }, gateway(TWO_FIT))
    assert chat(gw, "alpha")[0] == 200
    assert chat(gw, "beta")[0] == 200
    assert chat(gw, "alpha")[0] == 200  # a is now the most recently used; pinned anyway
    # gamma does not fit beside a and b: b goes (a is pinned), to sleep
    assert chat(gw, "gamma")[0] == 200
    assert states(gw) == {"a": "ready", "b": "sleeping", "c": "ready"}
    # beta again: c is the only evictable engine awake; it cannot sleep, so it stops
    assert chat(gw, "beta")[0] == 200
    wait_until(lambda: states(gw)["c"] == "stopped", 30, "c to stop")
    assert states(gw) == {"a": "ready", "b": "ready", "c": "stopped"}
    assert gw.status()["swaps"] == 2
    log = gw.journal("vllm-gateway.service")
    assert "came back" in log  # the memory check after c stopped and b slept


def test_in_flight_work_on_an_evicted_engine_finishes_first(gw: Gateway) -> None:
    gw.configure_engines({
        "a": engine(["alpha"], "--token-interval-ms", "100"),
        "b": engine(["beta"]),
    }, gateway(ONE_FITS))
    assert chat(gw, "alpha")[0] == 200
    slow: dict[str, Any] = {}

    def long_stream() -> None:
        slow["result"] = gw.chat(model="alpha", stream=True, max_tokens=20)

    t = threading.Thread(target=long_stream)
    t.start()
    wait_until(lambda: gw.status()["engines"]["a"]["in_flight"] == 1, 30, "alpha's stream to be in flight")
    t0 = time.monotonic()
    assert chat(gw, "beta")[0] == 200
    t.join(60)
    code, _, body = slow["result"]
    assert code == 200 and body.rstrip().endswith(b"data: [DONE]")
    assert time.monotonic() - t0 > 1.0  # beta waited for alpha's stream (20 x 100 ms)
    wait_until(lambda: states(gw)["a"] == "stopped", 30, "a to stop")


def test_mixed_load_swaps_in_batches_not_per_request(gw: Gateway) -> None:
    gw.configure_engines({
        "a": engine(["alpha"], sleep_after="10m"),
        "b": engine(["beta"], sleep_after="10m"),
    }, gateway(ONE_FITS))
    results: list[int] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 8.0

    def client(model: str) -> None:
        while time.monotonic() < stop_at:
            code = chat(gw, model)[0]
            with lock:
                results.append(code)

    threads = [threading.Thread(target=client, args=(m,)) for m in ("alpha", "beta") * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    swaps = gw.status()["swaps"]
    assert results and all(code == 200 for code in results), set(results)
    # 8 s with a 1 s min_residency: at most ~8 swaps, however many requests
    assert swaps <= 12, swaps
    assert len(results) >= 4 * max(1, swaps), (len(results), swaps)


def test_a_busy_gpu_is_answered_at_once_and_the_engine_not_started(gw: Gateway) -> None:
    gw.configure_engines({"a": engine(["alpha"])}, gateway(ONE_FITS))
    # another program takes most of the fake GPU
    gw.hold_memory("game", SLICE, 200)
    try:
        t0 = time.monotonic()
        code, headers, body = gw.chat(model="alpha")
        took = time.monotonic() - t0
        assert code == 503, body
        message = json.loads(body)["error"]["message"]
        # `memory` (180 MiB), or what the engine was measured to hold in an earlier test
        assert "not enough GPU memory for the engine 'a'" in message
        assert re.search(r"needs 1[5-9]\d MiB", message), message
        assert "free" in message and "other programs hold about" in message
        assert headers.get("retry-after")
        assert took < 5.0
        assert gw.active("vllm-a.service") != "active"
    finally:
        gw.sb.systemctl("stop", "game.service", check=False)
    # the stop returns once the unit's processes are gone, their memory with them
    code, answer = chat(gw, "alpha")
    assert code == 200, answer


def test_yield_frees_the_gpu_until_released(gw: Gateway) -> None:
    gw.configure_engines({"a": engine(["alpha"], sleep_after="10m"), "b": engine(["beta"])},
                         gateway(TWO_FIT))
    assert chat(gw, "alpha")[0] == 200 and chat(gw, "beta")[0] == 200
    done = vllm_gateway(gw, "yield", "--by", "whisper")
    assert done.returncode == 0, done.stderr
    assert "GPU yielded to whisper" in done.stdout
    assert states(gw) == {"a": "sleeping", "b": "stopped"}
    t0 = time.monotonic()
    code, _, body = gw.chat(model="beta")
    assert code == 503 and b"yielded to other work (whisper)" in body and time.monotonic() - t0 < 5
    assert gw.active("vllm-b.service") != "active"
    assert gw.status()["holds"].keys() == {"whisper"}
    assert vllm_gateway(gw, "release", "--by", "whisper").returncode == 0
    assert chat(gw, "beta")[0] == 200 and chat(gw, "alpha")[0] == 200


def test_a_unit_with_the_drop_in_takes_the_gpu_for_its_lifetime(gw: Gateway) -> None:
    gw.configure_engines({"a": engine(["alpha"])}, gateway(TWO_FIT))
    assert chat(gw, "alpha")[0] == 200
    units = f"{gw.home}/.config/systemd/user"
    gw.sb.write_file(f"{units}/trainer.service", "[Service]\nExecStart=/bin/sleep 600\n")
    gw.sb.write_file(
        f"{units}/trainer.service.d/yield-gpu.conf",
        "[Service]\nExecStartPre=%h/.local/bin/vllm-gateway yield --by %n\n"
        "ExecStopPost=%h/.local/bin/vllm-gateway release --by %n\n",
    )
    gw.sb.systemctl("daemon-reload")
    gw.sb.systemctl("start", "trainer.service")
    assert states(gw)["a"] == "stopped"
    assert chat(gw, "alpha")[0] == 503
    gw.sb.systemctl("stop", "trainer.service")
    assert gw.status()["holds"] == {}
    assert chat(gw, "alpha")[0] == 200


def test_an_engine_dropped_from_the_configuration_is_stopped(gw: Gateway) -> None:
    gw.configure_engines({"a": engine(["alpha"]), "b": engine(["beta"])}, gateway(TWO_FIT))
    assert chat(gw, "alpha")[0] == 200 and chat(gw, "beta")[0] == 200
    gw.configure_engines({"a": engine(["alpha"])}, gateway(TWO_FIT), stop_engines=False)
    assert gw.active("vllm-b.service") == "active"  # still running from the old configuration
    assert chat(gw, "alpha")[0] == 200
    wait_until(lambda: gw.active("vllm-b.service") != "active", 30, "the dropped engine to stop")
    assert "stopping vllm-b.service: vllm-gateway started it" in gw.journal("vllm-gateway.service")
