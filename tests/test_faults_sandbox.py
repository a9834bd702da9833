"""Engine faults end to end: crashes and hangs mid-stream reach the client as
a clean end, and the next request gets a fresh engine."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from tests.gatewaying import Gateway, wait_until
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    yield Gateway(sandbox)


def stream(gw: Gateway, reply: str) -> tuple[int, str]:
    code, _, body = gw.request("POST", "/v1/chat/completions", {
        "model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}],
        "fake_reply": reply})
    return code, body.decode()


def test_engine_crash_mid_stream_ends_cleanly_and_the_next_request_starts_a_fresh_one(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1", "--crash-after-tokens", "5", "--token-interval-ms", "20"],
                 stop_timeout="2s")
    code, text = stream(gw, "a b c d e f g h i j k l m n o p")
    assert code == 200
    last = [e for e in text.split("\n\n") if e.startswith("data: ")][-1]
    assert "stopped responding" in json.loads(last[6:])["error"]["message"]
    wait_until(lambda: gw.status()["state"] in ("stopped", "failed"), 20, "the shim to see the crash")
    code, _, _ = gw.chat(fake_reply="ok")  # short: under the crash threshold
    assert code == 200


def test_other_streams_are_unaffected_by_one_broken_client(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1", "--token-interval-ms", "10"])
    assert gw.chat()[0] == 200
    results: list[str] = []

    def one() -> None:
        results.append(stream(gw, "x " * 40)[1])

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    c = gw.connect()  # a client that goes away mid-stream
    c.request("POST", "/v1/chat/completions", body=json.dumps({
        "model": "tiny", "stream": True, "messages": [], "fake_reply": "y " * 100}),
        headers={"Content-Type": "application/json"})
    resp = c.getresponse()
    resp.read1(100)
    c.close()
    for t in threads:
        t.join()
    assert all(r.rstrip().endswith("data: [DONE]") for r in results)


def test_a_hung_engine_times_out_and_is_restarted(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "1", "--hang-after-tokens", "3", "--token-interval-ms", "10"],
                 read_timeout="2s", stop_timeout="2s")
    first_pid = None
    code, text = stream(gw, "a b c d e f g h")
    assert code == 200
    last = [e for e in text.split("\n\n") if e.startswith("data: ")][-1]
    assert "sent nothing for 2 s" in json.loads(last[6:])["error"]["message"]
    wait_until(lambda: gw.active("vllm.service") == "inactive", 20, "the hung engine to be stopped")
    assert "stopping it as hung" in gw.journal("vllm-gateway")
    code, _, _ = gw.chat(fake_reply="ok")
    assert code == 200
    del first_pid


def test_repeated_start_failures_back_off_instead_of_relaunching(gw: Gateway) -> None:
    gw.configure(["--fail-at-startup", "boom"])
    codes = [gw.chat()[0] for _ in range(10)]
    assert codes == [503] * 10
    # ten requests within the cool-down: one launch
    assert gw.journal("vllm-gateway").count("failed to start") >= 1
    launches = gw.journal("vllm").count("EngineCore failed to start")
    assert launches == 1, launches
