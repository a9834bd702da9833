"""What the gateway asks of systemd, without systemd: the properties of a
transient engine unit."""

from __future__ import annotations

from shim.engine import IDLE_TIMER
from shim.systemd import TransientService


def service(**extra: object) -> TransientService:
    fields: dict[str, object] = {"name": "e.service", "argv": ["/bin/true"], "environment": {},
                                 "description": "d", "stop_timeout_s": 1, "syslog_identifier": "e"}
    return TransientService(**{**fields, **extra})  # type: ignore[arg-type]


def test_a_transient_service_wants_nothing_unless_told() -> None:
    assert "Wants" not in dict(service().properties())


def test_an_engine_unit_pulls_in_the_idle_timer() -> None:
    props = dict(service(wants=(IDLE_TIMER,)).properties())
    assert props["Wants"] == ("as", ["vllm-gateway-idle.timer"])
