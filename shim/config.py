"""The configuration: one TOML file, declared here, checked at start-up.

Every error names the file and the key, e.g.
``config.toml: engines.main.port: must be 1..65535``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .durations import parse_duration

DEFAULT_PATH = Path("~/.config/vllm-gateway/config.toml")
DEFAULT_ENGINE_PORT = 8100
DEFAULT_UNIT = "vllm.service"
# Several engines: engine NAME runs as vllm-NAME.service on 8100, 8101, ...
UNIT_TEMPLATE = "vllm-{}.service"
# An engine swapped in serves at least this long before another may evict
# it while it is in use: a swap costs seconds to a minute, so alternating
# requests must not swap at every request.
DEFAULT_MIN_RESIDENCY_S = 10.0
# vLLM's cold start is ~60 s for a 9B model and can take many minutes for
# large ones (torch.compile, CUDA graphs): five minutes covers most.
DEFAULT_START_TIMEOUT_S = 300.0
DEFAULT_STOP_AFTER_S = 600.0
# vLLM drains and frees VRAM within seconds; past this systemd sends SIGKILL.
DEFAULT_STOP_TIMEOUT_S = 30.0
# A stop asked for (manual, yield, eviction) lets requests in flight finish
# this long, then cuts them: a 400-token answer takes a few seconds on a GPU.
DEFAULT_STOP_GRACE_S = 10.0
DEFAULT_EXIT_AFTER_S = 300.0
DEFAULT_READ_TIMEOUT_S = 600.0
DEFAULT_STREAM_KEEPALIVE_S = 5.0
TOOL_CALL_FORMATS = ("off", "nemotron", "hermes", "mistral")


class ConfigError(Exception):
    def __init__(self, path: str, key: str, message: str) -> None:
        name = os.path.basename(path) if path else "config"
        super().__init__(f"{name}: {key}: {message}" if key else f"{name}: {message}")
        self.path = path
        self.key = key


@dataclass(frozen=True)
class EngineConfig:
    name: str
    command: tuple[str, ...]
    port: int = DEFAULT_ENGINE_PORT
    environment: Mapping[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    health_path: str = "/health"
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    stop_after_s: float | None = DEFAULT_STOP_AFTER_S
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S
    stop_grace_s: float = DEFAULT_STOP_GRACE_S
    unit: str = DEFAULT_UNIT
    tool_call_format: str = "off"
    # A guardrail the engine cannot be talked out of: requests asking for more
    # are refused ("reject") or lowered to it ("cap"); requests without a
    # limit get this one. None: no limit.
    max_tokens: int | None = None
    max_tokens_policy: str = "reject"
    # Once the engine took a request it may think long before the first byte
    # (a long prompt's prefill); between streamed bytes it is quick. Silence
    # past this means it hangs: the client gets an error, the unit is stopped.
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    # GPU memory (bytes) the engine holds when awake; None: vLLM's
    # --gpu-memory-utilization (default 0.9) of the GPU, or all of it.
    memory: int | None = None
    # Never evicted to make room for another engine (yield still applies).
    pinned: bool = False
    # The GPUs it runs on (NVML/CUDA indices); None: unspecified, planned as
    # GPU 0 and started without CUDA_VISIBLE_DEVICES, as on a one-GPU machine.
    gpus: tuple[int, ...] | None = None
    # Sleep tier: put the engine to sleep (level 1: weights to CPU RAM; level
    # 2: weights dropped) after this idle time; None keeps it awake.
    sleep_after_s: float | None = None
    sleep_level: int = 1

    def argv(self, *, sleep: bool) -> list[str]:
        """The engine's command line; the gateway owns the address it listens on,
        and adds the flag that sleep mode needs."""
        extra = ["--enable-sleep-mode"] if sleep and "--enable-sleep-mode" not in self.command else []
        return [*self.command, *extra, "--host", "127.0.0.1", "--port", str(self.port)]

    def memory_needed(self, gpu_total: int | None) -> int | None:
        """The GPU memory the engine needs awake: its `memory`, else vLLM's
        own rule (free memory >= gpu_memory_utilization x total); None when
        neither is known (the engine then runs alone)."""
        if self.memory is not None:
            return self.memory
        if gpu_total is None:
            return None
        return int(gpu_total * self.gpu_memory_utilization())

    def gpu_memory_utilization(self) -> float:
        args = list(self.command)
        for i, arg in enumerate(args):
            value = None
            if arg == "--gpu-memory-utilization" and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith("--gpu-memory-utilization="):
                value = arg.partition("=")[2]
            if value is not None:
                try:
                    return min(1.0, max(0.0, float(value)))
                except ValueError:
                    break
        return 0.9

    @property
    def devices(self) -> tuple[int, ...]:
        """The GPUs the engine occupies, for planning: its `gpus`, else GPU 0."""
        return self.gpus or (0,)

    def env(self, *, sleep: bool) -> dict[str, str]:
        """The engine's environment; sleep mode's endpoints need vLLM's dev mode."""
        return {**self.environment, **self.device_env(), **({"VLLM_SERVER_DEV_MODE": "1"} if sleep else {})}

    def device_env(self) -> dict[str, str]:
        """With `gpus`: CUDA sees those devices only, numbered as NVML and
        nvidia-smi number them (CUDA's own default order is fastest first)."""
        if self.gpus is None:
            return {}
        return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpus))}


@dataclass(frozen=True)
class FakeGpu:
    """A stand-in GPU: the RAM of the processes in `slice` counts as its used memory."""

    slice: str
    memory: int  # bytes


@dataclass(frozen=True)
class GatewayConfig:
    engines: Mapping[str, EngineConfig]
    listen_host: str = "127.0.0.1"
    listen_port: int = 8000
    # When the engine is stopped and no connection came for this long, the
    # shim exits; the socket unit keeps the port and starts it again.
    exit_after_s: float | None = DEFAULT_EXIT_AFTER_S
    # Requests waiting for a cold start; past this they get a 503 at once.
    max_waiting: int = 1024
    # Streamed requests that wait through a cold start or a wake get an SSE
    # comment this often, so that clients and proxies (nginx's default read
    # timeout is 60 s) do not give up on a silent connection. None: off.
    stream_keepalive_s: float | None = DEFAULT_STREAM_KEEPALIVE_S
    # Bearer keys that clients must send; empty: no check (the default on
    # loopback). The admin key opens /gateway/start|stop|sleep|wake on the
    # public port; without one they answer only on the local control socket.
    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    # Open client connections; past this new ones get a 503 and are closed.
    max_connections: int = 2048
    # The GPU memory the gateway may plan with (bytes); None: the GPU's total
    # as NVML reports it, or no limit without NVML.
    gpu_memory: int | None = None
    min_residency_s: float = DEFAULT_MIN_RESIDENCY_S
    # A stand-in GPU for trying several engines without one, and for tests:
    # the memory of every process in this slice counts as used GPU memory.
    fake_gpu_slice: str | None = None
    fake_gpu_memory: int = 0
    # Several stand-in GPUs (index = place in the list), each a slice and a
    # budget; the single-device form above is GPU 0 of this list.
    fake_gpus: tuple[FakeGpu, ...] = ()
    source: str = ""

    def fake_gpu(self, index: int) -> FakeGpu | None:
        return self.fake_gpus[index] if 0 <= index < len(self.fake_gpus) else None

    def engine_slice(self, engine: EngineConfig) -> str | None:
        """The slice an engine runs in: its first GPU's, with a fake GPU."""
        fake = self.fake_gpu(engine.devices[0])
        return fake.slice if fake else self.fake_gpu_slice

    @property
    def engine(self) -> EngineConfig:
        """The first (with one engine, the only) engine."""
        return next(iter(self.engines.values()))

    def engine_for_model(self, model: str) -> EngineConfig | None:
        for engine in self.engines.values():
            if model in engine.models:
                return engine
        return None

    def all_models(self) -> list[str]:
        return [m for engine in self.engines.values() for m in engine.models]


def config_path() -> Path:
    env = os.environ.get("VLLM_GATEWAY_CONFIG")
    return Path(env) if env else DEFAULT_PATH.expanduser()


def load(path: Path | None = None) -> GatewayConfig:
    path = path or config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), "", f"no configuration file at {path}") from None
    except OSError as e:
        raise ConfigError(str(path), "", f"cannot read {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(str(path), "", f"not valid TOML: {e}") from None
    return parse(data, str(path))


def parse(data: Mapping[str, Any], source: str = "config.toml") -> GatewayConfig:
    c = _Checker(source)
    c.only_keys(data, "", {"gateway", "engines"})
    gw = data.get("gateway", {})
    c.table(gw, "gateway")
    c.only_keys(gw, "gateway", {
        "listen", "exit_after", "max_waiting", "stream_keepalive", "api_keys", "admin_key",
        "max_connections", "gpu_memory", "min_residency", "fake_gpu",
    })
    api_keys = tuple(c.string_list(gw.get("api_keys", []), "gateway.api_keys"))
    if any(len(key) < 8 for key in api_keys):
        raise ConfigError(source, "gateway.api_keys", "every key must have at least 8 characters")
    admin_key = gw.get("admin_key")
    if admin_key is not None and (not isinstance(admin_key, str) or len(admin_key) < 8):
        raise ConfigError(source, "gateway.admin_key", "must be a string of at least 8 characters")
    if admin_key is not None and admin_key in api_keys:
        raise ConfigError(source, "gateway.admin_key", "must differ from every API key")
    host, port = "127.0.0.1", 8000
    if "listen" in gw:
        host, port = c.address(gw["listen"], "gateway.listen")
    exit_after = c.duration_or_off(gw.get("exit_after", DEFAULT_EXIT_AFTER_S), "gateway.exit_after")
    max_waiting = c.integer(gw.get("max_waiting", 1024), "gateway.max_waiting", 1, 1_000_000)
    keepalive = c.duration_or_off(gw.get("stream_keepalive", DEFAULT_STREAM_KEEPALIVE_S),
                                  "gateway.stream_keepalive")

    engines_raw = data.get("engines")
    if engines_raw is None:
        raise ConfigError(source, "engines", "missing: add an [engines.NAME] table")
    c.table(engines_raw, "engines")
    if not engines_raw:
        raise ConfigError(source, "engines", "must define at least one [engines.NAME] table")
    several = len(engines_raw) > 1
    engines = {
        name: _engine(c, name, table, index if several else None)
        for index, (name, table) in enumerate(engines_raw.items())
    }
    _check_distinct(c, engines)
    fake_slice, fake_memory = None, 0
    fakes: tuple[FakeGpu, ...] = ()
    if "fake_gpu" in gw:
        fakes = _fake_gpus(c, gw["fake_gpu"])
        fake_slice, fake_memory = fakes[0].slice, fakes[0].memory
    _check_gpus(c, engines, len(fakes))
    return GatewayConfig(
        engines=engines,
        listen_host=host,
        listen_port=port,
        exit_after_s=exit_after,
        max_waiting=max_waiting,
        stream_keepalive_s=keepalive,
        api_keys=api_keys,
        admin_key=admin_key,
        max_connections=c.integer(gw.get("max_connections", 2048), "gateway.max_connections", 1, 1_000_000),
        gpu_memory=None if gw.get("gpu_memory") is None else c.size(gw["gpu_memory"], "gateway.gpu_memory"),
        min_residency_s=c.duration(gw.get("min_residency", DEFAULT_MIN_RESIDENCY_S), "gateway.min_residency"),
        fake_gpu_slice=fake_slice,
        fake_gpu_memory=fake_memory,
        fake_gpus=fakes,
        source=source,
    )


_ENGINE_KEYS = {
    "command", "port", "environment", "models", "health_path", "start_timeout",
    "stop_after", "stop_timeout", "stop_grace", "unit", "tool_call_format", "sleep_after", "sleep_level",
    "max_tokens", "max_tokens_policy", "read_timeout", "memory", "pinned", "gpus",
}
# CUDA numbers devices from 0; 64 is beyond any single machine.
MAX_GPUS = 64


def _fake_gpus(c: _Checker, fake: Any) -> tuple[FakeGpu, ...]:
    """[gateway.fake_gpu]: one device (slice, memory) or several (devices = [{slice, memory}, ...])."""
    c.table(fake, "gateway.fake_gpu")
    if "devices" in fake:
        c.only_keys(fake, "gateway.fake_gpu", {"devices"})
        devices = fake["devices"]
        if not isinstance(devices, list) or not devices:
            raise c.fail("gateway.fake_gpu.devices", "must be a list of {slice = ..., memory = ...} tables")
        tables = [(f"gateway.fake_gpu.devices[{i}]", d) for i, d in enumerate(devices)]
        default = None
    else:
        tables = [("gateway.fake_gpu", fake)]
        default = "vllm-gateway-gpu.slice"
    fakes: list[FakeGpu] = []
    for key, table in tables:
        c.table(table, key)
        c.only_keys(table, key, {"slice", "memory"})
        slice = table.get("slice", default)
        if not isinstance(slice, str) or not slice.endswith(".slice") or "/" in slice:
            raise c.fail(f"{key}.slice", "must be a unit name ending in .slice")
        if "memory" not in table:
            raise c.fail(f"{key}.memory", "missing: the stand-in GPU's size, e.g. \"2GiB\"")
        if any(f.slice == slice for f in fakes):
            raise c.fail(f"{key}.slice", f"{slice} is already another fake GPU's slice")
        fakes.append(FakeGpu(slice, c.size(table["memory"], f"{key}.memory")))
    return tuple(fakes)


def _gpus(c: _Checker, value: Any, key: str) -> tuple[int, ...]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_GPUS for i in value)):
        raise c.fail(key, f"must be a list of GPU indices 0..{MAX_GPUS - 1}, e.g. [1] or [0, 1]")
    if len(set(value)) != len(value):
        raise c.fail(key, "names a GPU twice")
    return tuple(value)


def _check_gpus(c: _Checker, engines: Mapping[str, EngineConfig], fake_count: int) -> None:
    """Engines name fake GPUs that exist, and do not set the devices twice."""
    for name, e in engines.items():
        if e.gpus is None:
            continue
        if "CUDA_VISIBLE_DEVICES" in e.environment:
            raise c.fail(f"engines.{name}.environment.CUDA_VISIBLE_DEVICES",
                         "set by the gateway from `gpus`: set one of them, not both")
        if fake_count and max(e.gpus) >= fake_count:
            raise c.fail(f"engines.{name}.gpus", f"GPU {max(e.gpus)} is not one of the "
                         f"{fake_count} fake GPUs of gateway.fake_gpu")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _check_distinct(c: _Checker, engines: Mapping[str, EngineConfig]) -> None:
    """Two engines must not share a port, a unit or a model name."""
    ports: dict[int, str] = {}
    units: dict[str, str] = {}
    models: dict[str, str] = {}
    for name, e in engines.items():
        k = f"engines.{name}"
        if e.port in ports:
            raise c.fail(f"{k}.port", f"{e.port} is also the port of engines.{ports[e.port]}")
        if e.unit in units:
            raise c.fail(f"{k}.unit", f"{e.unit} is also the unit of engines.{units[e.unit]}")
        for model in e.models:
            if model in models:
                raise c.fail(f"{k}.models", f"{model!r} is also served by engines.{models[model]}")
            models[model] = name
        ports[e.port] = units[e.unit] = name


def _engine(c: _Checker, name: str, t: Any, index: int | None) -> EngineConfig:
    """One [engines.NAME] table; `index` is its place when there are several."""
    k = f"engines.{name}"
    if not _NAME.fullmatch(name):
        raise c.fail(k, "an engine's name may only hold letters, digits, '-' and '_' (it names its unit)")
    c.table(t, k)
    c.only_keys(t, k, _ENGINE_KEYS)
    if "command" not in t:
        raise ConfigError(c.source, f"{k}.command", "missing: the engine's command line as a list")
    command = c.string_list(t["command"], f"{k}.command")
    if not command:
        raise ConfigError(c.source, f"{k}.command", "must not be empty")
    for flag in ("--port", "--host"):
        if flag in command:
            raise ConfigError(
                c.source, f"{k}.command",
                f"must not set {flag}: the gateway appends --host 127.0.0.1 --port PORT itself",
            )
    env = t.get("environment", {})
    c.table(env, f"{k}.environment")
    for key, value in env.items():
        if not isinstance(value, str):
            raise ConfigError(c.source, f"{k}.environment.{key}", "must be a string")
    models = c.string_list(t.get("models", []), f"{k}.models")
    if index is not None and not models:
        raise c.fail(f"{k}.models", "missing: with several engines, requests are routed by their model, "
                     "so each engine lists the model names it serves")
    unit = t.get("unit", DEFAULT_UNIT if index is None else UNIT_TEMPLATE.format(name))
    if not isinstance(unit, str) or not unit.endswith(".service") or "/" in unit:
        raise ConfigError(c.source, f"{k}.unit", "must be a unit name ending in .service")
    health = t.get("health_path", "/health")
    if not isinstance(health, str) or not health.startswith("/"):
        raise ConfigError(c.source, f"{k}.health_path", "must be a path starting with /")
    fmt = t.get("tool_call_format", "off")
    if fmt not in TOOL_CALL_FORMATS:
        raise ConfigError(
            c.source, f"{k}.tool_call_format", f"must be one of {', '.join(TOOL_CALL_FORMATS)}"
        )
    start_timeout = c.duration(t.get("start_timeout", DEFAULT_START_TIMEOUT_S), f"{k}.start_timeout")
    if start_timeout <= 0:
        raise ConfigError(c.source, f"{k}.start_timeout", "must be greater than zero")
    return EngineConfig(
        name=name,
        command=tuple(command),
        port=c.integer(t.get("port", DEFAULT_ENGINE_PORT + (index or 0)), f"{k}.port", 1, 65535),
        environment=dict(env),
        models=tuple(models),
        health_path=health,
        start_timeout_s=start_timeout,
        stop_after_s=c.duration_or_off(t.get("stop_after", DEFAULT_STOP_AFTER_S), f"{k}.stop_after"),
        stop_timeout_s=c.duration(t.get("stop_timeout", DEFAULT_STOP_TIMEOUT_S), f"{k}.stop_timeout"),
        stop_grace_s=c.duration(t.get("stop_grace", DEFAULT_STOP_GRACE_S), f"{k}.stop_grace"),
        unit=unit,
        tool_call_format=fmt,
        sleep_after_s=c.duration_or_off(t.get("sleep_after", "off"), f"{k}.sleep_after"),
        sleep_level=c.integer(t.get("sleep_level", 1), f"{k}.sleep_level", 1, 2),
        max_tokens=None if t.get("max_tokens") is None
        else c.integer(t["max_tokens"], f"{k}.max_tokens", 1, 10_000_000),
        read_timeout_s=c.positive_duration(t.get("read_timeout", DEFAULT_READ_TIMEOUT_S),
                                           f"{k}.read_timeout"),
        max_tokens_policy=c.choice(t.get("max_tokens_policy", "reject"), f"{k}.max_tokens_policy",
                                   ("reject", "cap")),
        memory=None if t.get("memory") is None else c.size(t["memory"], f"{k}.memory"),
        pinned=c.boolean(t.get("pinned", False), f"{k}.pinned"),
        gpus=None if t.get("gpus") is None else _gpus(c, t["gpus"], f"{k}.gpus"),
    )


@dataclass
class _Checker:
    source: str

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, key, message)

    def table(self, value: Any, key: str) -> None:
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table")

    def only_keys(self, table: Mapping[str, Any], prefix: str, allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                where = f"{prefix}.{key}" if prefix else key
                raise self.fail(where, f"unknown key (known: {', '.join(sorted(allowed))})")

    def integer(self, value: Any, key: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"must be {low}..{high}")
        return value

    def duration(self, value: Any, key: str) -> float:
        try:
            return parse_duration(value)
        except ValueError as e:
            raise self.fail(key, str(e)) from None

    def duration_or_off(self, value: Any, key: str) -> float | None:
        if value == "off" or value is False:
            return None
        seconds = self.duration(value, key)
        return None if seconds == 0 else seconds

    def positive_duration(self, value: Any, key: str) -> float:
        seconds = self.duration(value, key)
        if seconds <= 0:
            raise self.fail(key, "must be greater than zero")
        return seconds

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false")
        return value

    def size(self, value: Any, key: str) -> int:
        try:
            return parse_size(value)
        except ValueError as e:
            raise self.fail(key, str(e)) from None

    def choice(self, value: Any, key: str, options: tuple[str, ...]) -> str:
        if value not in options:
            raise self.fail(key, f"must be one of {', '.join(options)}")
        return str(value)

    def string_list(self, value: Any, key: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "must be a list of strings")
        return list(value)

    def address(self, value: Any, key: str) -> tuple[str, int]:
        if not isinstance(value, str) or ":" not in value:
            raise self.fail(key, "must be \"HOST:PORT\", e.g. \"127.0.0.1:8000\"")
        host, _, port = value.rpartition(":")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise self.fail(key, "port must be 1..65535")
        return host.strip("[]"), int(port)


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(value: object) -> int:
    """Bytes from an integer or "24GiB", "24G", "512MiB", "1.5 GiB" (binary units)."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as \"24GiB\" or a number of bytes")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value
    m = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError("must be a size such as \"24GiB\", \"512MiB\" or a number of bytes")
    unit = (m.group(2) or "").upper()[:1]
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError("must be greater than zero")
    return n
