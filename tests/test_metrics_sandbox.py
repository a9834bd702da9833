"""/metrics after a scripted sequence: cold start, requests, sleep, wake, stop."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from tests.gatewaying import Gateway, wait_until
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    g = Gateway(sandbox)
    g.configure(["--startup-delay", "1", "--sleep-delay-s", "0.1", "--wake-delay-s", "0.1"],
                sleep_after="10m", stop_after="10m")
    yield g


def scrape(gw: Gateway) -> str:
    code, headers, body = gw.request("GET", "/metrics")
    assert code == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return body.decode()


def value(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    family = series.split("{")[0]
    assert m, f"{series} not in the scrape: {[x for x in text.splitlines() if family in x]}"
    return float(m.group(1))


def test_scraping_never_starts_the_engine(gw: Gateway) -> None:
    text = scrape(gw)
    assert value(text, 'vllm_gateway_engine_state{engine="main",state="stopped"}') == 1.0
    assert "vllm:" not in text
    assert gw.active("vllm.service") == "inactive"


def test_metrics_follow_a_scripted_sequence(gw: Gateway) -> None:
    assert gw.chat()[0] == 200  # cold start
    assert gw.chat()[0] == 200
    assert gw.request("POST", "/v1/chat/completions", b"{bad")[0] == 400
    text = scrape(gw)
    assert value(text, 'vllm_gateway_engine_state{engine="main",state="ready"}') == 1.0
    assert "vllm:num_requests_running" in text  # the engine's own metrics, appended
    assert gw.request("POST", "/gateway/sleep")[0] == 200
    assert gw.active("vllm.service") == "active"
    text = scrape(gw)
    assert value(text, 'vllm_gateway_engine_state{engine="main",state="sleeping"}') == 1.0
    assert "vllm:" not in text  # a sleeping engine is not even scraped
    assert gw.chat()[0] == 200  # wakes it
    assert gw.request("POST", "/gateway/stop")[0] == 200
    text = scrape(gw)
    assert value(text, 'vllm_gateway_cold_start_seconds_count{engine="main"}') == 1
    assert value(text, 'vllm_gateway_wake_seconds_count{engine="main"}') == 1
    assert value(text, 'vllm_gateway_sleeps_total{engine="main"}') == 1
    assert value(text, 'vllm_gateway_stops_total{cause="manual",engine="main"}') == 1
    assert value(text, 'vllm_gateway_requests_total{route="/v1/chat/completions",status="200"}') == 3
    assert value(text, 'vllm_gateway_requests_total{route="/v1/chat/completions",status="400"}') == 1
    assert value(text, 'vllm_gateway_engine_state{engine="main",state="stopped"}') == 1.0
    assert value(text, 'vllm_gateway_engine_state_seconds_total{engine="main",state="ready"}') > 0
    assert value(text, 'vllm_gateway_requests_in_flight{engine="main"}') == 0


def test_unknown_paths_share_one_series(gw: Gateway) -> None:
    for i in range(5):
        gw.request("GET", f"/no/such/{i}")
    text = scrape(gw)
    assert value(text, 'vllm_gateway_requests_total{route="other",status="404"}') >= 5
    assert "/no/such" not in text


def test_request_lines_carry_journal_fields(gw: Gateway) -> None:
    gw.request("POST", "/gateway/stop")
    code, _, _ = gw.request("POST", "/v1/chat/completions",
                            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
                            headers={"X-Request-Id": "find-me-42"})
    assert code == 200
    entries: list[dict[str, str]] = []

    def found() -> bool:
        out = gw.sb.run(["journalctl", "--no-pager", "-o", "json", "REQUEST_ID=find-me-42"]).stdout
        entries[:] = [json.loads(line) for line in out.splitlines() if line.strip()]
        return bool(entries)

    wait_until(found, 10, "the request's journal entry")
    (entry,) = entries
    assert entry["MODEL"] == "tiny"
    assert entry["STATUS"] == "200"
    assert int(entry["COLD_START_MS"]) > 0  # it waited for the start
    assert int(entry["DURATION_MS"]) >= int(entry["COLD_START_MS"])  # the wait is part of it
    assert "POST /v1/chat/completions 200" in entry["MESSAGE"]
