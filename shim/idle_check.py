"""`vllm-gateway idle-check`: run by vllm-gateway-idle.timer. Stops the
engine when it has been idle past its threshold with nothing in flight.

It reads the shim's STATUS from systemd, so it needs no connection to the
shim. If the shim is not running but the engine is, the idle time counts
from whichever came later: the engine's start or the shim's exit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from . import systemd
from .config import EngineConfig
from .status import parse_status

log = logging.getLogger("vllm_gateway.idle_check")

SHIM_UNIT = "vllm-gateway.service"


@dataclass(frozen=True)
class Verdict:
    stop: bool
    reason: str


def decide(
    engine: EngineConfig, unit: systemd.UnitState, shim: systemd.UnitState, now: float
) -> Verdict:
    """Pure decision, so every case is testable without systemd."""
    if not unit.running:
        return Verdict(False, f"{engine.unit} is not running ({unit.active_state})")
    if engine.stop_after_s is None:
        return Verdict(False, "stop_after is off")
    if shim.running:
        st = parse_status(shim.status_text)
        if st is None:
            return Verdict(False, f"{SHIM_UNIT} has not reported its status yet")
        if st.in_flight > 0:
            return Verdict(False, f"{st.in_flight} requests in flight")
        idle = st.idle_s(now)
    else:
        since_us = max(unit.active_enter_us, shim.inactive_enter_us)
        idle = now - since_us / 1e6
    if idle < engine.stop_after_s:
        return Verdict(False, f"idle {idle:.0f} s of {engine.stop_after_s:g} s")
    return Verdict(True, f"idle {idle:.0f} s, past stop_after {engine.stop_after_s:g} s")


async def run(engine: EngineConfig) -> int:
    async with systemd.connect() as sd:
        unit = await sd.unit_state(engine.unit)
        shim = await sd.unit_state(SHIM_UNIT)
        verdict = decide(engine, unit, shim, time.time())
        if verdict.stop:
            log.info("stopping %s: %s", engine.unit, verdict.reason)
            await sd.stop_unit(engine.unit)
        else:
            log.debug("keeping %s: %s", engine.unit, verdict.reason)
    return 0
