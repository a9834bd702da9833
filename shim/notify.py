"""sd_notify: readiness, the STATUS text, and the watchdog."""

from __future__ import annotations

import logging
import os

import sdnotify

log = logging.getLogger("vllm_gateway.notify")


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None
        self._last_status = ""

    def _send(self, text: str) -> None:
        if self._n is not None:
            self._n.notify(text)

    def ready(self) -> None:
        self._send("READY=1")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    @staticmethod
    def watchdog_interval_s() -> float | None:
        """Half of systemd's WatchdogSec, when it is set for us."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2_000_000
