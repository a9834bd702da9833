"""The GPU keys of the configuration: `gpus` per engine and several fake GPUs."""

from __future__ import annotations

from typing import Any

import pytest

from shim.config import ConfigError, FakeGpu, parse

CMD = ["vllm", "serve", "some/model"]


def two(a: dict[str, Any], b: dict[str, Any], **gateway: Any) -> dict[str, Any]:
    return {"gateway": gateway, "engines": {
        "a": {"command": CMD, "models": ["alpha"], **a},
        "b": {"command": CMD, "models": ["beta"], **b},
    }}


def error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return str(info.value)


def test_without_gpus_an_engine_is_planned_on_gpu_0_and_its_environment_is_untouched() -> None:
    e = parse({"engines": {"main": {"command": CMD, "environment": {"HF_HOME": "/x"}}}}).engine
    assert e.gpus is None and e.devices == (0,)
    assert e.env(sleep=False) == {"HF_HOME": "/x"}


def test_gpus_become_cuda_visible_devices_in_nvml_order() -> None:
    cfg = parse(two({"gpus": [1]}, {"gpus": [0, 1], "environment": {"HF_HOME": "/x"}}))
    a, b = cfg.engines["a"], cfg.engines["b"]
    assert a.devices == (1,) and b.devices == (0, 1)
    assert a.env(sleep=False) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1"}
    assert b.env(sleep=True) == {"HF_HOME": "/x", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                                 "CUDA_VISIBLE_DEVICES": "0,1", "VLLM_SERVER_DEV_MODE": "1"}


@pytest.mark.parametrize("value", [[], [-1], [64], ["1"], [True], 1, [0, 0]])
def test_bad_gpus_are_refused_naming_the_key(value: object) -> None:
    assert "config.toml: engines.a.gpus: " in error(two({"gpus": value}, {}))


def test_gpus_and_cuda_visible_devices_together_are_refused() -> None:
    message = error(two({"gpus": [1], "environment": {"CUDA_VISIBLE_DEVICES": "1"}}, {}))
    assert "engines.a.environment.CUDA_VISIBLE_DEVICES: set by the gateway from `gpus`" in message


def test_the_single_fake_gpu_form_is_device_0() -> None:
    cfg = parse(two({}, {}, fake_gpu={"slice": "f.slice", "memory": "1GiB"}))
    assert cfg.fake_gpus == (FakeGpu("f.slice", 2**30),)
    assert (cfg.fake_gpu_slice, cfg.fake_gpu_memory) == ("f.slice", 2**30)
    assert cfg.engine_slice(cfg.engines["a"]) == "f.slice"


def test_several_fake_gpus_put_each_engine_in_its_first_device_slice() -> None:
    devices = [{"slice": "g0.slice", "memory": "1GiB"}, {"slice": "g1.slice", "memory": "512MiB"}]
    cfg = parse(two({"gpus": [1]}, {"gpus": [0, 1]}, fake_gpu={"devices": devices}))
    assert cfg.fake_gpus == (FakeGpu("g0.slice", 2**30), FakeGpu("g1.slice", 2**29))
    assert cfg.engine_slice(cfg.engines["a"]) == "g1.slice"
    assert cfg.engine_slice(cfg.engines["b"]) == "g0.slice"
    assert cfg.fake_gpu(2) is None


@pytest.mark.parametrize(("fake", "key", "words"), [
    ({"devices": []}, "gateway.fake_gpu.devices", "must be a list"),
    ({"devices": [{"slice": "g0.slice"}]}, "gateway.fake_gpu.devices[0].memory", "missing"),
    ({"devices": [{"memory": "1GiB"}]}, "gateway.fake_gpu.devices[0].slice", "ending in .slice"),
    ({"devices": [{"slice": "g.slice", "memory": "1GiB"}, {"slice": "g.slice", "memory": "1GiB"}]},
     "gateway.fake_gpu.devices[1].slice", "already another fake GPU's slice"),
    ({"devices": [{"slice": "g.slice", "memory": "1GiB"}], "memory": "1GiB"}, "gateway.fake_gpu.memory",
     "unknown key"),
])
def test_bad_fake_gpus_are_refused_naming_the_key(fake: dict[str, Any], key: str, words: str) -> None:
    message = error(two({}, {}, fake_gpu=fake))
    assert f"config.toml: {key}: " in message and words in message


def test_an_engine_on_a_fake_gpu_that_does_not_exist_is_refused() -> None:
    message = error(two({"gpus": [1]}, {}, fake_gpu={"slice": "g.slice", "memory": "1GiB"}))
    assert "engines.a.gpus: GPU 1 is not one of the 1 fake GPUs" in message
