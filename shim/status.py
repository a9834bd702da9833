"""The shim's sd_notify STATUS text: written in one place, parsed in one place.

systemd keeps the last STATUS= line of a service, and ``systemctl status``
shows it; the idle check reads it back over D-Bus as the ``StatusText``
property. The format is ``key=value`` pairs separated by spaces, e.g.::

    state=ready in_flight=0 idle_since=1795000000.123 idle_s=42 unit=vllm.service

With several engines, one such text per engine, joined by "; ".

``idle_since`` is wall-clock (epoch) seconds so that another process can
compute the idle time exactly, whenever it reads the text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShimStatus:
    state: str
    in_flight: int
    idle_since: float | None  # None while requests are in flight
    unit: str
    # False where sleep_after is set but the engine refused sleep mode: the
    # idle check then asks for no sleep (written as `sleep=no`)
    can_sleep: bool = True

    def format(self, now: float) -> str:
        idle_since = "-" if self.idle_since is None else f"{self.idle_since:.3f}"
        idle_s = 0 if self.idle_since is None else max(0, int(now - self.idle_since))
        return (
            f"state={self.state} in_flight={self.in_flight} "
            f"idle_since={idle_since} idle_s={idle_s} unit={self.unit}"
            + ("" if self.can_sleep else " sleep=no")
        )

    def idle_s(self, now: float) -> float:
        return 0.0 if self.idle_since is None else max(0.0, now - self.idle_since)


def format_statuses(statuses: list[ShimStatus], now: float) -> str:
    return "; ".join(st.format(now) for st in statuses)


def parse_statuses(text: str) -> dict[str, ShimStatus]:
    """Every engine's status in a STATUS text, by unit."""
    out = {}
    for part in text.split(";"):
        st = parse_status(part)
        if st is not None:
            out[st.unit] = st
    return out


def parse_status(text: str) -> ShimStatus | None:
    """Parse one engine's STATUS text; None when it is not one of ours (e.g. empty)."""
    fields = dict(p.split("=", 1) for p in text.split() if "=" in p)
    try:
        idle = fields["idle_since"]
        return ShimStatus(
            state=fields["state"],
            in_flight=int(fields["in_flight"]),
            idle_since=None if idle == "-" else float(idle),
            unit=fields["unit"],
            can_sleep=fields.get("sleep") != "no",
        )
    except (KeyError, ValueError):
        return None
