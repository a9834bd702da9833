"""The last requests the gateway answered, for the status page. Pure logic.

A fixed-size ring in memory: the request path adds one record per answer
(a deque append, no I/O), the status page reads them. Nothing is kept on
disk; the journal has the full history.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# What the page shows: enough to see who waited for what, small enough to
# send with every change (about 150 bytes a record).
RING_SIZE = 50


@dataclass(frozen=True)
class RequestRecord:
    at: float  # epoch seconds of the answer's end
    method: str
    route: str  # the route's metrics label: known paths, or "other"
    model: str | None
    status: int
    duration_ms: float
    cold_start_ms: float | None  # the wait for a start or wake, when there was one

    def as_json(self) -> dict[str, object]:
        return {
            "at": round(self.at, 3),
            "method": self.method,
            "route": self.route,
            "model": self.model,
            "status": self.status,
            "duration_ms": round(self.duration_ms, 1),
            "cold_start_ms": None if self.cold_start_ms is None else round(self.cold_start_ms),
        }


class RequestRing:
    """The last `size` records, oldest first; the request path is its only writer."""

    def __init__(self, size: int = RING_SIZE) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=size)
        self.added = 0  # records ever added: tells readers whether anything is new

    def add(self, record: RequestRecord) -> None:
        self._records.append(record)
        self.added += 1

    def records(self) -> list[RequestRecord]:
        return list(self._records)

    def as_json(self) -> list[dict[str, object]]:
        """Newest first, as the page lists them."""
        return [r.as_json() for r in reversed(self._records)]
