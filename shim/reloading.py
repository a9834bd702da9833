"""A configuration reload in the running shim (`systemctl --user reload
vllm-gateway`, `vllm-gateway reload`, SIGHUP): the file is checked first and
a bad one is refused, keeping what runs; the journal says what changed.

The gateway's configuration has one writer: `reload` here, called from the
gateway's own tasks. The engines get theirs through their owner's inbox.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from . import confdiff, config
from .config import GatewayConfig
from .engine import Engine
from .errors import BadRequest
from .lifecycle import State

log = logging.getLogger("vllm_gateway.reload")


class Reloadable(Protocol):
    cfg: GatewayConfig
    engines: dict[str, Engine]

    def apply_config(self, cfg: GatewayConfig) -> None: ...


def reload(gateway: Reloadable) -> dict[str, object]:
    """Read the configuration file again and apply it; the plan's summary.
    Raises BadRequest (naming the file and the key) for a bad file."""
    old = gateway.cfg
    path = Path(old.source) if old.source else config.config_path()
    try:
        new = config.load(path)
    except config.ConfigError as e:
        log.error("reload refused: %s; the running configuration stays", e)
        raise BadRequest(f"vllm-gateway: reload refused, the running configuration stays: {e}") from None
    running = {name for name, e in gateway.engines.items() if not e.in_state(State.STOPPED, State.FAILED)}
    plan = confdiff.plan(old, new, running)
    if not plan.changes:
        log.info("reload: %s has no changes", path)
    for change in plan.changes:
        later = change in plan.later
        log.info("reload: %s%s", change.describe(), " (applies when the gateway restarts)" if later else "")
    for name in plan.restart:
        log.info("reload: engine %s runs an old command line: it is restarted when idle "
                 "(now: vllm-gateway restart %s)", name, name)
    gateway.apply_config(plan.config)
    for name, engine in gateway.engines.items():
        engine.reconfigure(plan.config.engines[name], plan.restart.get(name))
    return plan.summary()


def running_config(cfg: GatewayConfig) -> dict[str, str]:
    """What `GET /gateway/config` answers: the keys in effect, secrets digested."""
    return confdiff.flatten(cfg)
