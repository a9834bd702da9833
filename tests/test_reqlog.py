"""The request log line: the same record as log.info would make."""

from __future__ import annotations

import logging

from shim.reqlog import RequestLog


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _kept(name: str, level: int) -> tuple[logging.Logger, _Keep]:
    """A logger of its own whose records are kept, not printed."""
    log = logging.getLogger(name)
    keep = _Keep()
    log.handlers[:] = [keep]
    log.setLevel(level)
    log.propagate = False
    return log, keep


def test_same_record_as_log_info() -> None:
    log, keep = _kept("test.reqlog", logging.INFO)
    try:
        fast = RequestLog(log, __file__, "test_same_record_as_log_info")
        for i in range(3):
            fields = {"REQUEST_ID": f"r{i}", "STATUS": 200 + i}
            fast.info(10, "%s %d", ("a", i), fields)
            log.info("%s %d", "a", i, extra=fields)
        pairs = list(zip(keep.records[::2], keep.records[1::2], strict=True))
        for n, (ours, theirs) in enumerate(pairs):
            a, b = dict(ours.__dict__), dict(theirs.__dict__)
            for name in ("created", "msecs", "relativeCreated", "lineno"):
                a.pop(name), b.pop(name)
            assert a == b
            assert ours.getMessage() == f"a {n}"
            assert abs(ours.created - theirs.created) < 1
            assert abs(ours.relativeCreated - theirs.relativeCreated) < 1000
    finally:
        log.removeHandler(keep)


def test_quiet_when_info_is_off() -> None:
    log, keep = _kept("test.reqlog.quiet", logging.WARNING)
    RequestLog(log, __file__, "f").info(1, "x", (), {"A": 1})
    assert keep.records == []
