"""The stop policy's values: which stops wait, and what cut clients are told."""

from __future__ import annotations

import pytest

from shim.stopping import GRACEFUL, RETRY_UNANSWERED, cut_message


@pytest.mark.parametrize(("cause", "detail", "says"), [
    ("manual", "", "the engine 'main' was stopped by vllm-gateway stop"),
    ("yield", "whisper.service", "the engine 'main' yielded the GPU to whisper.service"),
    ("yield", "", "the engine 'main' yielded the GPU to other work"),
    ("evicted", "the engine 'coder'",
     "the engine 'main' was swapped out to make room for the engine 'coder'"),
    ("dropped", "", "the engine 'main' was removed from the configuration"),
    ("external", "", "the engine 'main' was stopped outside the gateway"),
    ("hung", "", "the engine 'main' was stopped as hung"),
    ("idle", "", "the engine 'main' was stopped (idle)"),
])
def test_the_message_names_the_cause(cause: str, detail: str, says: str) -> None:
    message = cut_message("main", cause, detail)
    assert message.startswith("vllm-gateway: " + says)
    assert message.endswith("; the request was cut")


def test_the_stops_somebody_asked_for_wait_and_the_others_do_not() -> None:
    assert {"manual", "yield", "evicted", "dropped"} == GRACEFUL
    assert "idle" not in GRACEFUL and "hung" not in GRACEFUL and "external" not in GRACEFUL
    # a manual stop or a yield must not start the engine again for a cut request
    assert "manual" not in RETRY_UNANSWERED and "yield" not in RETRY_UNANSWERED
