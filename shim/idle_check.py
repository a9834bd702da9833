"""`vllm-gateway idle-check`: run by vllm-gateway-idle.timer. Puts the
engine to sleep after `sleep_after`, and stops it after `stop_after`, when
it has been idle that long with nothing in flight.

It reads the shim's STATUS from systemd. Stopping goes through systemd; the
sleep goes through the shim's control socket, since the shim alone calls the
engine's control endpoints (one owner knows the state). If the shim is not
running but the engine is, only the stop tier applies, and the idle time
counts from whichever came later: the engine's start or the shim's exit.

The rule itself (`verdict`) is pure, and the one that counts while the shim
runs is the engine owner's: a stop or a sleep this check asks for is
decided again by the engine on its live state (engine.py,
`Engine.idle_verdict`), so a request that came, or came and went, after
the status was read keeps it awake.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass

from . import control, lifecycle, systemd
from .config import EngineConfig, GatewayConfig
from .status import parse_statuses

log = logging.getLogger("vllm_gateway.idle_check")

SHIM_UNIT = "vllm-gateway.service"


class Action(enum.Enum):
    NONE = "none"
    SLEEP = "sleep"
    STOP = "stop"


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str

    @property
    def stop(self) -> bool:
        return self.action is Action.STOP


def idle_since_without_shim_us(unit: systemd.UnitState, shim: systemd.UnitState) -> int:
    """With no shim to report it, idle time counts from the later of the
    engine's start and the shim's exit (realtime microseconds; 0 if neither)."""
    return max(unit.active_enter_us, shim.inactive_enter_us)


def decide(
    engine: EngineConfig, unit: systemd.UnitState, shim: systemd.UnitState, now: float
) -> Verdict:
    """Pure decision, so every case is testable without systemd."""
    none = Action.NONE
    if not unit.running:
        return Verdict(none, f"{engine.unit} is not running ({unit.active_state})")
    if shim.running:
        st = parse_statuses(shim.status_text).get(engine.unit)
        if st is None:
            return Verdict(none, f"{SHIM_UNIT} has not reported its status yet")
        return verdict(engine, st.state, st.in_flight, st.idle_s(now), st.can_sleep)
    return verdict(engine, "unknown", 0, now - idle_since_without_shim_us(unit, shim) / 1e6, True)


def verdict(engine: EngineConfig, state: str, in_flight: int, idle: float, can_sleep: bool) -> Verdict:
    """The rule on an engine's load: `state` as STATUS names it, the requests
    in flight, the seconds idle, and whether it can sleep."""
    none = Action.NONE
    if in_flight > 0:
        return Verdict(none, f"{in_flight} requests in flight")
    if engine.stop_after_s is not None and idle >= engine.stop_after_s:
        return Verdict(Action.STOP, f"idle {idle:.0f} s, past stop_after {engine.stop_after_s:g} s")
    sleep_tier = lifecycle.named(state) in lifecycle.SLEEP_TIER
    if engine.sleep_after_s is not None and idle >= engine.sleep_after_s and sleep_tier and can_sleep:
        return Verdict(Action.SLEEP, f"idle {idle:.0f} s, past sleep_after {engine.sleep_after_s:g} s")
    return Verdict(none, f"idle {idle:.0f} s (engine {state})")


async def run(cfg: GatewayConfig) -> int:
    async with systemd.connect() as sd:
        shim = await sd.unit_state(SHIM_UNIT)
        for engine in cfg.engines.values():
            await _check(sd, engine, shim)
    return 0


async def _check(sd: systemd.Systemd, engine: EngineConfig, shim: systemd.UnitState) -> None:
    unit = await sd.unit_state(engine.unit)
    verdict = decide(engine, unit, shim, time.time())
    which = f"engine={engine.name}"
    if verdict.action is Action.STOP:
        log.info("stopping %s: %s", engine.unit, verdict.reason)
        # through the shim when it runs: it refuses if a request arrived
        # since it wrote the status we read, and counts the stop as idle
        # the threshold read now goes along: a stop_after changed in the
        # file applies to the running engine without a reload
        target = f"/gateway/stop?cause=idle&{which}&stop_after={engine.stop_after_s!r}"
        answer = await control.request("POST", target) if shim.running else None
        if answer is None:
            await sd.stop_unit(engine.unit)
    elif verdict.action is Action.SLEEP:
        log.info("asking the gateway to put %s to sleep: %s", engine.unit, verdict.reason)
        # the engine decides again on its live state, with the threshold read now
        answer = await control.request(
            "POST", f"/gateway/sleep?cause=idle&{which}&sleep_after={engine.sleep_after_s!r}")
        if answer is None:
            log.warning("the gateway's control socket %s did not answer", control.socket_path())
        elif answer[0] != 200:
            log.info("the gateway kept the engine awake: %s", answer[1].decode(errors="replace"))
    else:
        log.debug("keeping %s: %s", engine.unit, verdict.reason)
