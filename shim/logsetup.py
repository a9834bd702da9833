"""Logging: to the journal with structured fields when systemd runs us,
else plain lines to stderr. Under systemd the journal adds time and unit."""

from __future__ import annotations

import logging
import os
import sys


def configure(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler

            # fields passed as `extra=` (REQUEST_ID, MODEL, ...) become journal fields
            handler = JournalHandler(SYSLOG_IDENTIFIER="vllm-gateway")
        except ImportError:
            handler = None  # systemd-python is optional: plain lines, no fields
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
