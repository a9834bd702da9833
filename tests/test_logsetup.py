"""The journal handler: which fields an entry carries (sendv itself is
systemd-python's; the sandbox tier checks real entries in a real journal)."""

from __future__ import annotations

import logging

import pytest

from shim.logsetup import JournalHandler


@pytest.fixture
def sent() -> list[list[str]]:
    return []


@pytest.fixture
def log(sent: list[list[str]]) -> logging.Logger:
    handler = JournalHandler(lambda *fields: sent.append(list(fields)), "vllm-gateway")
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("vllm_gateway.test_logsetup")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def fields(entry: list[str]) -> dict[str, str]:
    return dict(f.split("=", 1) for f in entry)


def test_a_request_line_carries_its_fields_and_no_record_internals(
    log: logging.Logger, sent: list[list[str]]
) -> None:
    log.info("POST %s %d", "/v1/chat/completions", 200,
             extra={"REQUEST_ID": "r-1", "STATUS": 200, "MODEL": "m", "lower": "no"})
    (entry,) = sent
    f = fields(entry)
    assert f["MESSAGE"] == "vllm_gateway.test_logsetup: POST /v1/chat/completions 200"
    assert f["PRIORITY"] == "6" and f["SYSLOG_IDENTIFIER"] == "vllm-gateway"
    assert f["LOGGER"] == "vllm_gateway.test_logsetup"
    assert f["CODE_FILE"].endswith("test_logsetup.py") and int(f["CODE_LINE"]) > 0
    assert f["CODE_FUNC"] == "test_a_request_line_carries_its_fields_and_no_record_internals"
    assert (f["REQUEST_ID"], f["STATUS"], f["MODEL"]) == ("r-1", "200", "m")
    # what the journal records itself, or nobody reads, is not sent
    assert not {"ARGS", "CREATED", "MSECS", "THREAD_NAME", "LOWER", "lower"} & f.keys()
    assert len(entry) == 10


@pytest.mark.parametrize("level, priority", [
    (logging.DEBUG, "7"), (logging.INFO, "6"), (logging.WARNING, "4"), (logging.ERROR, "3"),
    (logging.CRITICAL, "2"),
])
def test_priorities(log: logging.Logger, sent: list[list[str]], level: int, priority: str) -> None:
    log.log(level, "x")
    assert fields(sent[0])["PRIORITY"] == priority


def test_an_exception_keeps_its_traceback_in_the_message(log: logging.Logger, sent: list[list[str]]) -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("unexpected error")
    message = fields(sent[0])["MESSAGE"]
    assert message.startswith("vllm_gateway.test_logsetup: unexpected error\nTraceback")
    assert "ValueError: boom\nsecond line" in message


def test_a_failing_send_does_not_raise(log: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*fields: str) -> None:
        raise OSError("journal socket gone")

    handler = log.handlers[0]
    assert isinstance(handler, JournalHandler)
    monkeypatch.setattr(handler, "_sendv", broken)
    monkeypatch.setattr(logging, "raiseExceptions", False)
    log.warning("still fine")  # handleError, not an exception in the request path
