"""Logging: to the journal with structured fields when systemd runs us,
else plain lines to stderr. Under systemd the journal adds time and unit."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable

# Attributes passed with `extra=` under a journal field name (REQUEST_ID,
# MODEL, ...) become fields of the entry; LogRecord's own are lower case.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def _priority(levelno: int) -> str:
    """syslog's priority for a logging level."""
    if levelno >= logging.CRITICAL:
        return "2"
    if levelno >= logging.ERROR:
        return "3"
    if levelno >= logging.WARNING:
        return "4"
    if levelno >= logging.INFO:
        return "6"
    return "7"


class JournalHandler(logging.Handler):
    """One journal entry per record, with the fields worth keeping: MESSAGE,
    PRIORITY, SYSLOG_IDENTIFIER, LOGGER, CODE_FILE, CODE_LINE, CODE_FUNC and
    the caller's own fields.

    systemd-python's JournalHandler also sends every attribute of the
    LogRecord (ARGS, CREATED, MSECS, THREAD, LEVELNAME... some twenty
    fields): each request line cost ~4x the CPU and several times the bytes
    in the journal, for fields that repeat what the journal records itself.
    """

    def __init__(self, sendv: Callable[..., None], identifier: str) -> None:
        super().__init__()
        self._sendv = sendv
        self._identifier = "SYSLOG_IDENTIFIER=" + identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = [
                "MESSAGE=" + self.format(record),
                "PRIORITY=" + _priority(record.levelno),
                self._identifier,
                "LOGGER=" + record.name,
                "CODE_FILE=" + record.pathname,
                f"CODE_LINE={record.lineno}",
                "CODE_FUNC=" + record.funcName,
            ]
            match = _FIELD_NAME.fullmatch
            for name, value in record.__dict__.items():
                if match(name):
                    fields.append(f"{name}={value}")
            self._sendv(*fields)
        except Exception:
            self.handleError(record)


def configure(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import sendv

            handler = JournalHandler(sendv, "vllm-gateway")
        except ImportError:
            handler = None  # systemd-python is optional: plain lines, no fields
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
