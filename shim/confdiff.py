"""What differs between two configurations, and how a reload applies it.

Pure logic: configurations in, changes and a plan out. A reload applies
most keys at once (thresholds, keys, limits, formats); a running engine
whose command line changed keeps running its old one until it is
restarted (when idle, or by `vllm-gateway restart`); a few keys only
apply when the gateway itself restarts, and the plan says which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from .config import EngineConfig, GatewayConfig

# Keys of an engine that its running process was started with.
ENGINE_RESTART_KEYS = ("command", "port", "environment", "health_path", "sleep_level")
# Keys that the gateway reads once, when it starts: the units it follows,
# the model routing table, the GPUs it plans with.
ENGINE_LATER_KEYS = ("unit", "models", "gpus")
GATEWAY_LATER_KEYS = (
    "listen_host", "listen_port", "gpu_memory", "fake_gpu_slice", "fake_gpu_memory", "fake_gpus",
)
SECRET_KEYS = ("api_keys", "admin_key")
# Not configuration: where it was read from.
_IGNORED = ("source", "engines", "name")


@dataclass(frozen=True)
class Change:
    key: str  # e.g. "engines.main.stop_after_s"
    old: str | None  # None: not there before
    new: str | None  # None: not there now

    def describe(self) -> str:
        if self.old is None:
            return f"{self.key}: added ({self.new})"
        if self.new is None:
            return f"{self.key}: removed (was {self.old})"
        return f"{self.key}: {self.old} -> {self.new}"


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...]
    config: GatewayConfig  # what applies now
    # engines that run an old command line: restart them with this configuration
    restart: Mapping[str, EngineConfig]
    later: tuple[Change, ...]  # changes that apply when the gateway restarts

    def summary(self) -> dict[str, object]:
        return {
            "changed": [c.describe() for c in self.changes],
            "restart_when_idle": sorted(self.restart),
            "when_the_gateway_restarts": [c.describe() for c in self.later],
        }


def render(key: str, value: object) -> str:
    """One value as text; secrets as a short digest, so that a change shows
    but the secret does not."""
    if key in SECRET_KEYS:
        if not value:
            return "(none)"
        digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
        return f"(secret {digest})"
    if isinstance(value, Mapping):
        value = dict(value)
    if isinstance(value, tuple):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
                 for v in value]
    return json.dumps(value, sort_keys=True)


def flatten(cfg: GatewayConfig) -> dict[str, str]:
    """Every key of the configuration as `gateway.KEY` / `engines.NAME.KEY` -> text."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cfg):
        if f.name not in _IGNORED:
            out[f"gateway.{f.name}"] = render(f.name, getattr(cfg, f.name))
    for name, engine in cfg.engines.items():
        for f in dataclasses.fields(engine):
            if f.name not in _IGNORED:
                out[f"engines.{name}.{f.name}"] = render(f.name, getattr(engine, f.name))
    return out


def diff(old: Mapping[str, str], new: Mapping[str, str]) -> list[Change]:
    """The keys whose text differs, in a stable order."""
    return [Change(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]


def plan(old: GatewayConfig, new: GatewayConfig, running: Collection[str]) -> Plan:
    """How to go from `old` to `new` while the engines named in `running` hold a process."""
    changes = tuple(diff(flatten(old), flatten(new)))
    later = [c for c in changes if _later(c.key, old, new)]
    keep_gateway = {k: getattr(old, k) for k in GATEWAY_LATER_KEYS}
    engines: dict[str, EngineConfig] = {}
    restart: dict[str, EngineConfig] = {}
    for name, was in old.engines.items():
        wanted = new.engines.get(name)
        if wanted is None:  # removed: the gateway keeps serving it until it restarts
            engines[name] = was
            continue
        wanted = dataclasses.replace(wanted, **{k: getattr(was, k) for k in ENGINE_LATER_KEYS})
        was_sleep = was.sleep_after_s is not None
        sleep = was_sleep or wanted.sleep_after_s is not None
        if name in running and _launch(was, was_sleep) != _launch(wanted, sleep):
            restart[name] = wanted
            kept = {k: getattr(was, k) for k in ENGINE_RESTART_KEYS}
            if was.sleep_after_s is None:  # started without sleep mode: it cannot sleep yet
                kept["sleep_after_s"] = None
            wanted = dataclasses.replace(wanted, **kept)
        engines[name] = wanted
    config = dataclasses.replace(new, engines=engines, **keep_gateway)
    return Plan(changes, config, restart, tuple(later))


def _launch(e: EngineConfig, sleep: bool) -> tuple[object, ...]:
    """What the engine's process is started with: its command line and
    environment (with sleep mode's flag or not), and the keys it is probed with."""
    env = sorted(e.env(sleep=sleep).items())
    return (e.argv(sleep=sleep), env, *(getattr(e, k) for k in ENGINE_RESTART_KEYS))


def _later(key: str, old: GatewayConfig, new: GatewayConfig) -> bool:
    parts = key.split(".")
    if parts[0] == "gateway":
        return parts[1] in GATEWAY_LATER_KEYS
    name = parts[1]
    return name not in old.engines or name not in new.engines or parts[2] in ENGINE_LATER_KEYS
