"""The configuration file: defaults, and errors that name the file and the key."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from shim import config
from shim.config import ConfigError, EngineConfig, GatewayConfig, load, parse

CMD = ["vllm", "serve", "some/model"]


def minimal(**engine: Any) -> dict[str, Any]:
    return {"engines": {"main": {"command": list(CMD), **engine}}}


def error(data: dict[str, Any], source: str = "config.toml") -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, source)
    return str(info.value)


def test_defaults() -> None:
    cfg = parse(minimal())
    assert isinstance(cfg, GatewayConfig)
    assert cfg.listen_host == "127.0.0.1"
    assert cfg.listen_port == 8000
    assert cfg.exit_after_s == config.DEFAULT_EXIT_AFTER_S
    assert cfg.max_waiting == 1024
    assert cfg.source == "config.toml"
    e = cfg.engine
    assert list(cfg.engines) == ["main"]
    assert e.name == "main"
    assert e.command == tuple(CMD)
    assert e.port == config.DEFAULT_ENGINE_PORT
    assert e.environment == {}
    assert e.models == ()
    assert e.health_path == "/health"
    assert e.start_timeout_s == config.DEFAULT_START_TIMEOUT_S
    assert e.stop_after_s == config.DEFAULT_STOP_AFTER_S
    assert e.stop_timeout_s == config.DEFAULT_STOP_TIMEOUT_S
    assert e.stop_grace_s == config.DEFAULT_STOP_GRACE_S == 10.0
    assert e.unit == config.DEFAULT_UNIT
    assert e.tool_call_format == "off"


def test_every_key_set() -> None:
    cfg = parse({
        "gateway": {"listen": "[::1]:9000", "exit_after": "off", "max_waiting": 7},
        "engines": {"big": {
            "command": CMD, "port": 8200, "environment": {"CUDA_VISIBLE_DEVICES": "1"},
            "models": ["a", "b"], "health_path": "/ping", "start_timeout": "10m",
            "stop_after": "1h30m", "stop_timeout": 5, "stop_grace": "0s", "unit": "big.service",
            "tool_call_format": "hermes",
        }},
    })
    assert (cfg.listen_host, cfg.listen_port) == ("::1", 9000)
    assert cfg.exit_after_s is None
    assert cfg.max_waiting == 7
    e = cfg.engine
    assert e.name == "big"
    assert e.port == 8200
    assert e.environment == {"CUDA_VISIBLE_DEVICES": "1"}
    assert e.models == ("a", "b")
    assert e.health_path == "/ping"
    assert e.start_timeout_s == 600.0
    assert e.stop_after_s == 5400.0
    assert e.stop_timeout_s == 5.0
    assert e.stop_grace_s == 0.0
    assert e.unit == "big.service"
    assert e.tool_call_format == "hermes"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90s", 90.0), ("10m", 600.0), ("1h30m", 5400.0), (45, 45.0), (2.5, 2.5),
     ("off", None), (False, None), (0, None), ("0s", None)],
)
def test_stop_after_durations(value: object, seconds: float | None) -> None:
    assert parse(minimal(stop_after=value)).engine.stop_after_s == seconds


@pytest.mark.parametrize(("value", "seconds"), [("90s", 90.0), ("off", None), (0, None)])
def test_exit_after_durations(value: object, seconds: float | None) -> None:
    data = {**minimal(), "gateway": {"exit_after": value}}
    assert parse(data).exit_after_s == seconds


def plain_argv(e: EngineConfig) -> list[str]:
    """The command line without optional features (sleep mode adds a flag)."""
    if "sleep" in inspect.signature(e.argv).parameters:
        return e.argv(sleep=False)  # type: ignore[call-arg, unused-ignore]
    return e.argv()


def test_argv_appends_host_and_port() -> None:
    e = parse(minimal(port=8123)).engine
    assert plain_argv(e) == [*CMD, "--host", "127.0.0.1", "--port", "8123"]
    assert e.command == tuple(CMD)  # argv() does not change the command
    assert plain_argv(EngineConfig(name="x", command=("a",))) == [
        "a", "--host", "127.0.0.1", "--port", str(config.DEFAULT_ENGINE_PORT),
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (minimal(port=0), "config.toml: engines.main.port: must be 1..65535"),
        (minimal(port=65536), "config.toml: engines.main.port: must be 1..65535"),
        (minimal(port="8100"), "config.toml: engines.main.port: must be 1..65535"),
        (minimal(port=True), "config.toml: engines.main.port: must be 1..65535"),
        ({"engines": {"main": {}}}, "config.toml: engines.main.command: missing"),
        (minimal(command=[]), "config.toml: engines.main.command: must not be empty"),
        ({"engines": {"main": {"command": "vllm serve"}}},
         "config.toml: engines.main.command: must be a list of strings"),
        ({"engines": {"main": {"command": ["vllm", 1]}}},
         "config.toml: engines.main.command: must be a list of strings"),
        ({"engines": {"main": {"command": [*CMD, "--port", "1"]}}},
         "config.toml: engines.main.command: must not set --port"),
        ({"engines": {"main": {"command": [*CMD, "--host", "0.0.0.0"]}}},
         "config.toml: engines.main.command: must not set --host"),
        (minimal(environment={"A": 1}), "config.toml: engines.main.environment.A: must be a string"),
        (minimal(environment=["A=1"]), "config.toml: engines.main.environment: must be a table"),
        (minimal(models="a"), "config.toml: engines.main.models: must be a list of strings"),
        (minimal(health_path="health"), "config.toml: engines.main.health_path: must be a path"),
        (minimal(unit="vllm"), "config.toml: engines.main.unit: must be a unit name ending in .service"),
        (minimal(unit="a/b.service"), "config.toml: engines.main.unit: must be a unit name"),
        (minimal(tool_call_format="json"), "config.toml: engines.main.tool_call_format: must be one of"),
        (minimal(start_timeout=0), "config.toml: engines.main.start_timeout: must be greater than zero"),
        (minimal(start_timeout="off"), "config.toml: engines.main.start_timeout: 'off' is not a duration"),
        (minimal(start_timeout=-1), "config.toml: engines.main.start_timeout: must not be negative"),
        (minimal(stop_after="soon"), "config.toml: engines.main.stop_after: 'soon' is not a duration"),
        (minimal(stop_after=True), "config.toml: engines.main.stop_after: must be a duration"),
        (minimal(stop_timeout="10 minutes"), "config.toml: engines.main.stop_timeout: "),
        (minimal(stop_grace="soon"), "config.toml: engines.main.stop_grace: "),
        (minimal(colour="red"), "config.toml: engines.main.colour: unknown key (known: command,"),
        ({**minimal(), "extra": 1}, "config.toml: extra: unknown key (known: engines, gateway)"),
        ({**minimal(), "gateway": {"port": 1}}, "config.toml: gateway.port: unknown key"),
        ({**minimal(), "gateway": []}, "config.toml: gateway: must be a table"),
        ({**minimal(), "gateway": {"listen": "8000"}}, "config.toml: gateway.listen: must be \"HOST:PORT\""),
        ({**minimal(), "gateway": {"listen": 8000}}, "config.toml: gateway.listen: must be \"HOST:PORT\""),
        ({**minimal(), "gateway": {"listen": "h:0"}}, "config.toml: gateway.listen: port must be 1..65535"),
        ({**minimal(), "gateway": {"listen": "h:x"}}, "config.toml: gateway.listen: port must be 1..65535"),
        ({**minimal(), "gateway": {"max_waiting": 0}},
         "config.toml: gateway.max_waiting: must be 1..1000000"),
        ({**minimal(), "gateway": {"exit_after": "x"}}, "config.toml: gateway.exit_after: 'x' is not"),
        ({}, "config.toml: engines: missing: add an [engines.NAME] table"),
        ({"engines": {}}, "config.toml: engines: must define at least one"),
        ({"engines": []}, "config.toml: engines: must be a table"),
        ({"engines": {"main": "vllm"}}, "config.toml: engines.main: must be a table"),
        ({"engines": {"a": {"command": CMD}, "b": {"command": CMD}}},
         "config.toml: engines.a.models: missing: with several engines"),
        ({"engines": {"a": {"command": CMD, "models": ["x"]}, "b": {"command": CMD, "models": ["x"]}}},
         "config.toml: engines.b.models: 'x' is also served by engines.a"),
        ({"engines": {"a": {"command": CMD, "models": ["x"]}, "b": {"command": CMD, "models": ["y"],
                                                                    "port": 8100}}},
         "config.toml: engines.b.port: 8100 is also the port of engines.a"),
        ({"engines": {"a b": {"command": CMD}}}, "config.toml: engines.a b: an engine's name may only"),
        ({"engines": {"main": {"command": CMD, "memory": "lots"}}},
         "config.toml: engines.main.memory: must be a size"),
        ({"engines": {"main": {"command": CMD, "memory": 0}}},
         "config.toml: engines.main.memory: must be greater than zero"),
        ({"engines": {"main": {"command": CMD, "pinned": "yes"}}},
         "config.toml: engines.main.pinned: must be true or false"),
        ({**minimal(), "gateway": {"fake_gpu": {"slice": "x.slice"}}},
         "config.toml: gateway.fake_gpu.memory: missing"),
        ({**minimal(), "gateway": {"fake_gpu": {"slice": "x.service", "memory": "1GiB"}}},
         "config.toml: gateway.fake_gpu.slice: must be a unit name ending in .slice"),
        ({**minimal(), "gateway": {"gpu_memory": -1}}, "config.toml: gateway.gpu_memory: must be greater"),
    ],
)
def test_errors_name_file_and_key(data: dict[str, Any], expected: str) -> None:
    assert error(data).startswith(expected)


def test_error_names_the_file_by_its_base_name() -> None:
    with pytest.raises(ConfigError) as info:
        parse(minimal(port=0), "/home/me/.config/vllm-gateway/gw.toml")
    assert str(info.value) == "gw.toml: engines.main.port: must be 1..65535"
    assert info.value.key == "engines.main.port"
    assert info.value.path == "/home/me/.config/vllm-gateway/gw.toml"


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[gateway]\nlisten = "127.0.0.1:8001"\n\n'
        '[engines.main]\ncommand = ["vllm", "serve", "m"]\nstop_after = "90s"\n'
    )
    cfg = load(path)
    assert cfg.listen_port == 8001
    assert cfg.engine.stop_after_s == 90.0
    assert cfg.source == str(path)


def test_load_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[engines.main\ncommand = [")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith("config.toml: not valid TOML: ")


def test_load_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xff\xfe[engines]")
    with pytest.raises(ConfigError, match=r"^config\.toml: not valid TOML"):
        load(path)


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"^absent\.toml: no configuration file at "):
        load(path)


def test_load_validation_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('[engines.main]\ncommand = ["vllm"]\nport = 70000\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == "mine.toml: engines.main.port: must be 1..65535"


def test_config_path_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLLM_GATEWAY_CONFIG", str(tmp_path / "x.toml"))
    assert config.config_path() == tmp_path / "x.toml"
    monkeypatch.delenv("VLLM_GATEWAY_CONFIG")
    assert config.config_path().name == "config.toml"


def test_several_engines_get_their_own_units_and_ports() -> None:
    cfg = config.parse({
        "gateway": {"gpu_memory": "24GiB", "min_residency": "3s",
                    "fake_gpu": {"slice": "gpu.slice", "memory": "1.5GiB"}},
        "engines": {
            "chat": {"command": CMD, "models": ["small"], "memory": "6GiB", "pinned": True},
            "coder": {"command": CMD, "models": ["coder", "coder-fast"]},
        },
    })
    chat, coder = cfg.engines["chat"], cfg.engines["coder"]
    assert (chat.unit, chat.port, chat.memory, chat.pinned) == ("vllm-chat.service", 8100, 6 * 2**30, True)
    assert (coder.unit, coder.port, coder.memory, coder.pinned) == ("vllm-coder.service", 8101, None, False)
    assert len(cfg.engines) == 2 and cfg.gpu_memory == 24 * 2**30 and cfg.min_residency_s == 3.0
    assert (cfg.fake_gpu_slice, cfg.fake_gpu_memory) == ("gpu.slice", 3 * 2**29)
    assert cfg.engine_for_model("coder-fast") is coder and cfg.engine_for_model("nope") is None
    assert cfg.all_models() == ["small", "coder", "coder-fast"]


def test_one_engine_keeps_the_plain_unit_and_port() -> None:
    cfg = config.parse(minimal())
    assert (cfg.engine.unit, cfg.engine.port, len(cfg.engines)) == ("vllm.service", 8100, 1)


@pytest.mark.parametrize(("text", "expected"), [
    ("24GiB", 24 * 2**30), ("24G", 24 * 2**30), ("512MiB", 512 * 2**20), ("1.5 GiB", 3 * 2**29),
    (4096, 4096), ("100", 100), ("2tib", 2 * 2**40),
])
def test_sizes(text: object, expected: int) -> None:
    assert config.parse_size(text) == expected


def test_memory_needed_follows_vllms_utilization_rule() -> None:
    e = config.EngineConfig(name="e", command=("vllm", "serve", "m", "--gpu-memory-utilization", "0.5"))
    assert e.memory_needed(80 * 2**30) == 40 * 2**30
    assert e.memory_needed(None) is None
    assert config.EngineConfig(name="e", command=("vllm",)).memory_needed(100) == 90
    quarter = config.EngineConfig(name="e", command=("x", "--gpu-memory-utilization=0.25"))
    assert quarter.memory_needed(100) == 25
    assert config.EngineConfig(name="e", command=("x",), memory=7).memory_needed(100) == 7
