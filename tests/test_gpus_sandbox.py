"""Two GPUs, end to end: each engine runs on its own GPUs, eviction stays on
the GPU that needs room, a busy GPU is named, `yield --gpu 1` takes only GPU 1,
and a sleeping engine that still holds memory is measured and counted.

Both GPUs are fake: a budget each, less what the processes in that GPU's
systemd slice hold (shim/gpu.py SliceProbe). Engines are fake-vllm with a
resident ballast that sleep frees (`--hold-rss-mb`) and one that it keeps
(`--hold-asleep-mb`), as vLLM keeps its CUDA context and graphs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.gatewaying import Gateway, wait_until
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

SLICES = ("fakegpu0.slice", "fakegpu1.slice")
HOLD_MB = 120
# fake-vllm's interpreter (~30 MiB) plus its ballast
ENGINE_MEMORY = f"{HOLD_MB + 60}MiB"
ONE_FITS = f"{HOLD_MB + 60 + 100}MiB"


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    yield Gateway(sandbox)


def engine(models: list[str], gpus: list[int], *extra: str, **table: Any) -> dict[str, Any]:
    return {"models": models, "gpus": gpus, "memory": ENGINE_MEMORY, "stop_after": "10m",
            "fake_args": ["--hold-rss-mb", str(HOLD_MB), "--startup-delay", "0.3", *extra], **table}


def two_gpus(*budgets: str) -> dict[str, Any]:
    devices = [{"slice": s, "memory": b} for s, b in zip(SLICES, budgets, strict=True)]
    return {"fake_gpu": {"devices": devices}, "min_residency": "1s"}


def states(gw: Gateway) -> dict[str, str]:
    return {name: e["state"] for name, e in gw.status()["engines"].items()}


def chat(gw: Gateway, model: str) -> tuple[int, dict[str, Any]]:
    code, _, body = gw.chat(model=model)
    return code, json.loads(body)


def vllm_gateway(gw: Gateway, *args: str, timeout: float = 120) -> Any:
    return gw.sb.run([f"{gw.home}/.local/bin/vllm-gateway", *args], check=False, timeout=timeout)


def test_engines_on_different_gpus_run_together_and_evict_only_on_their_gpu(gw: Gateway) -> None:
    gw.configure_engines({
        "a": engine(["alpha"], [0]),
        "b": engine(["beta"], [1]),
        "c": engine(["gamma"], [1]),
    }, two_gpus(ONE_FITS, ONE_FITS))
    assert chat(gw, "alpha")[0] == 200
    assert chat(gw, "beta")[0] == 200
    # each GPU fits one engine, and each has its own
    assert states(gw) == {"a": "ready", "b": "ready", "c": "stopped"}
    assert gw.unit_prop("vllm-a.service", "ControlGroup").startswith(f"/{SLICES[0]}/")
    assert gw.unit_prop("vllm-b.service", "ControlGroup").startswith(f"/{SLICES[1]}/")
    assert gw.unit_prop("vllm-b.service", "Environment").count("CUDA_VISIBLE_DEVICES=1") == 1
    # gamma needs GPU 1: b makes room there, although a was used less recently
    code, answer = chat(gw, "gamma")
    assert code == 200, answer
    wait_until(lambda: states(gw)["b"] == "stopped", 30, "b to stop")
    assert states(gw) == {"a": "ready", "b": "stopped", "c": "ready"}
    status = gw.status()
    assert status["gpus"]["0"]["engines"] == ["a"] and status["gpus"]["1"]["engines"] == ["b", "c"]
    assert status["gpus"]["1"]["total_bytes"] == (HOLD_MB + 160) * 2**20
    assert status["engines"]["c"]["gpus"] == [1]
    code, _, metrics = gw.request("GET", "/metrics")
    assert b'vllm_gateway_gpu_memory_free_bytes{gpu="1"}' in metrics


def test_a_busy_gpu_is_answered_at_once_naming_it_and_the_other_gpu_serves(gw: Gateway) -> None:
    gw.configure_engines({"a": engine(["alpha"], [0]), "b": engine(["beta"], [1])},
                         two_gpus(ONE_FITS, ONE_FITS))
    gw.hold_memory("game1.service", SLICES[1], 200)
    try:
        t0 = time.monotonic()
        code, headers, body = gw.chat(model="beta")
        took = time.monotonic() - t0
        assert code == 503, body
        message = json.loads(body)["error"]["message"]
        assert "not enough GPU memory for the engine 'b' on GPU 1" in message
        assert "other programs hold about" in message and headers.get("retry-after")
        assert took < 5.0
        assert gw.active("vllm-b.service") != "active"
        assert chat(gw, "alpha")[0] == 200  # GPU 0 is free
    finally:
        gw.sb.systemctl("stop", "game1.service", check=False)


def test_yield_of_gpu_1_takes_only_the_engines_on_it(gw: Gateway) -> None:
    gw.configure_engines({"a": engine(["alpha"], [0]), "b": engine(["beta"], [1], sleep_after="10m")},
                         two_gpus(ONE_FITS, ONE_FITS))
    assert chat(gw, "alpha")[0] == 200 and chat(gw, "beta")[0] == 200
    done = vllm_gateway(gw, "yield", "--gpu", "1", "--by", "whisper.service")
    assert done.returncode == 0, done.stderr
    assert "GPU 1 yielded to whisper.service" in done.stdout
    assert states(gw) == {"a": "ready", "b": "sleeping"}
    code, _, body = gw.chat(model="beta")
    assert code == 503, body
    assert b"GPU 1 of the engine 'b' is yielded to other work (whisper.service)" in body
    assert chat(gw, "alpha")[0] == 200  # GPU 0 still serves
    status = gw.status()
    assert status["held_gpus"] == {"whisper.service": [1]}
    assert status["gpus"]["1"]["held_by"] == ["whisper.service"] and status["gpus"]["0"]["held_by"] == []
    code, _, body = gw.request("POST", "/gateway/yield?by=x&gpu=one")
    assert code == 400 and b"`gpu` must be GPU indices 0..63 separated by commas" in body, body
    bad = vllm_gateway(gw, "yield", "--gpu", "-1", "--by", "x")
    assert bad.returncode == 2 and "--gpu: GPU indices" in bad.stderr, bad.stderr
    assert vllm_gateway(gw, "release", "--by", "whisper.service").returncode == 0
    assert chat(gw, "beta")[0] == 200
    assert states(gw) == {"a": "ready", "b": "ready"}


def test_a_sleeping_engine_that_still_holds_memory_is_measured_and_counted(gw: Gateway) -> None:
    # b frees 100 MiB asleep and keeps 200 (~330 awake, ~230 asleep); c holds ~230.
    # GPU 1 (420 MiB) fits either alone, and c beside b asleep only if b's
    # sleep freed everything.
    gw.configure_engines({
        "b": {**engine(["beta"], [1], "--hold-asleep-mb", "200", sleep_after="10m"),
              "fake_args": ["--hold-rss-mb", "100", "--hold-asleep-mb", "200", "--startup-delay", "0.3"],
              "memory": "330MiB"},
        "c": {**engine(["gamma"], [1]), "fake_args": ["--hold-rss-mb", "200", "--startup-delay", "0.3"],
              "memory": "230MiB"},
    }, two_gpus(ONE_FITS, "420MiB"))
    assert chat(gw, "beta")[0] == 200

    def now() -> int:
        """What b holds on GPU 1 by the last reading in its present state."""
        figures = gw.status()["engines"]["b"]["measured_memory"]["now"] or {}
        return int(figures.get("1", 0))

    wait_until(lambda: now() > 300 << 20, 30, "b's memory awake to be measured")
    awake = now()
    code, _, body = gw.request("POST", "/gateway/sleep?engine=b")
    assert code == 200, body
    wait_until(lambda: 200 << 20 < now() < awake - (80 << 20), 30, "b's memory asleep to be measured")
    kept = gw.status()["engines"]["b"]["measured_memory"]["asleep"]["1"]["1"]
    assert 200 << 20 < kept < awake - (80 << 20)
    code, _, metrics = gw.request("GET", "/metrics")
    assert b'vllm_gateway_engine_gpu_memory_bytes{engine="b",gpu="1",measure="asleep"}' in metrics
    wait_until(lambda: "on GPU 1 asleep (level 1) (measured)" in gw.journal("vllm-gateway.service"), 30,
               "the journal to say what b keeps asleep")

    # what b keeps asleep is counted: it is stopped to make room for c
    code, answer = chat(gw, "gamma")
    assert code == 200, answer
    wait_until(lambda: states(gw)["b"] == "stopped", 30, "b to stop")
    assert states(gw) == {"b": "stopped", "c": "ready"}
    assert "evicting b to make room for 'c'" in gw.journal("vllm-gateway.service")
