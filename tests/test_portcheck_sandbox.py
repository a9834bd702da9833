"""A stranger on the engine's port, in the sandbox: the gateway must not
start an engine there, nor take the stranger's answers for the engine's.
The client gets a 503 at once that names the port and the program."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from tests.fakevllm_util import FAKE_VLLM
from tests.gatewaying import Gateway, wait_until
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

# a start of the fake engine through systemd, on a loaded 2-core machine
START_S = 60.0


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox) -> Iterator[Gateway]:
    g = Gateway(sandbox)
    g.configure(["--startup-delay", "0.5"], stop_timeout="2s")
    yield g


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_stranger_on_the_engine_port_gets_no_start_and_no_traffic(gw: Gateway) -> None:
    # another server of the same user, in a unit of its own, healthy, serving another model
    gw.sb.run(["systemd-run", "--user", "--unit", "stranger", "--", sys.executable, str(FAKE_VLLM),
               "--served-model-name", "demo", "--host", "127.0.0.1", "--port", str(gw.engine_port)])
    try:
        wait_until(lambda: listening(gw.engine_port), START_S, "the stranger to listen")
        t0 = time.monotonic()
        status, headers, body = gw.chat()
        took = time.monotonic() - t0
        assert status == 503, body
        message = json.loads(body)["error"]["message"]
        assert f"port {gw.engine_port} is taken by pid " in message and "fake-vllm" in message, message
        assert "retry-after" in headers
        assert took < 10, f"the refusal took {took:.1f} s"
        assert gw.active("vllm.service") in ("inactive", "failed"), "an engine started beside the stranger"
    finally:
        gw.sb.systemctl("stop", "stranger.service", check=False)
    # the port is free again: after the cool-down the engine starts as usual
    wait_until(lambda: gw.chat()[0] == 200, START_S, "a normal start once the stranger is gone")


def test_the_gateways_own_engine_is_adopted_after_a_shim_restart(gw: Gateway) -> None:
    assert gw.chat()[0] == 200
    pid = gw.unit_prop("vllm.service", "MainPID")
    gw.sb.systemctl("restart", "vllm-gateway.service")
    status, _, body = gw.chat()
    assert status == 200, body
    assert gw.unit_prop("vllm.service", "MainPID") == pid  # the same engine, adopted


def test_a_stranger_that_answers_during_a_start_is_not_taken_for_the_engine(gw: Gateway) -> None:
    gw.configure(["--startup-delay", "30"], stop_timeout="2s")  # the engine listens only when ready
    result: dict[str, tuple[int, dict[str, str], bytes]] = {}
    waiting = threading.Thread(target=lambda: result.setdefault("chat", gw.chat()))
    waiting.start()
    try:
        wait_until(lambda: gw.active("vllm.service") == "active", START_S, "the engine to start")
        gw.sb.run(["systemd-run", "--user", "--unit", "stranger2", "--", sys.executable, str(FAKE_VLLM),
                   "--served-model-name", "demo", "--host", "127.0.0.1", "--port", str(gw.engine_port)])
        waiting.join(START_S)
        status, _, body = result["chat"]
        assert status == 503, body
        message = json.loads(body)["error"]["message"]
        assert f"port {gw.engine_port} is taken by pid " in message and "fake-vllm" in message, message
    finally:
        gw.sb.systemctl("stop", "stranger2.service", check=False)
        waiting.join(START_S)
