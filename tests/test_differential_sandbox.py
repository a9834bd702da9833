"""Differential fuzzing of the HTTP edge, both ways, in the sandbox: the
installed gateway in front of a strict recording engine
(tests/strict_engine.py: h11 reads every request and logs it before it
answers).

Requests: Hypothesis builds pipelined requests from Content-Length,
Transfer-Encoding, obs-folds, bare LF and CR, control bytes, duplicate
headers, odd versions and absolute-form targets, split anywhere. Each
request is built valid or with one known defect, so the oracle needs no
parser: the engine must log exactly the requests before the first defective
one, with their bodies (never more than the client sent), the client must
get their answers in order, then one refusal with the defect's status, and
the close.

Some requests carry `Expect: 100-continue`: the gateway answers it, and
the engine must never see the header.

Responses: many clients at once, each asking the engine (header
`x-hostile`) for a hostile answer: stray bytes after a body, two framings,
bad chunk lines, interim answers first, 101, a body cut short. Each client
checks by request id that it got its own answer or a clean 502, and the
engine must have seen each request exactly once.

`VLLM_GATEWAY_FUZZ_INPUTS=N` sets the number of generated inputs of each
test (the short CI run uses a few hundred); see docs/reliability.md.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gatewaying import Gateway
from tests.reliability_report import record
from tests.sandboxing import Sandbox

pytestmark = pytest.mark.sandbox

ENGINE = Path(__file__).resolve().parent / "strict_engine.py"
INPUTS = int(os.environ.get("VLLM_GATEWAY_FUZZ_INPUTS", "0"))
REQUEST_EXAMPLES = INPUTS or 250
RESPONSE_EXAMPLES = max(1, INPUTS // 20) if INPUTS else 25
ANSWER_TIMEOUT_S = 30.0
SETTINGS = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_ids = itertools.count()
FIGURES: dict[str, int] = {}


class EngineLog:
    """The engine's request log, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines()]


@pytest.fixture(scope="module")
def gw(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, EngineLog]]:
    path = tmp_path_factory.mktemp("differential") / "engine.jsonl"
    g = Gateway(sandbox)
    g.configure_command([sys.executable, str(ENGINE), "--log", str(path)], stop_after="off",
                        stop_timeout="2s")
    log = EngineLog(path)
    assert g.request("POST", "/v1/completions", {"model": "tiny", "prompt": "warm"},
                     headers={"X-Request-Id": "warm-up"})[0] == 200
    log.new()
    yield g, log


# ---- requests: built valid, or with one known defect ----

# defect -> the status the gateway answers it with
DEFECTS: dict[str, int] = {
    "cl+te": 400, "te+cl": 400, "two lengths": 400, "the same length twice": 400, "fold": 400,
    "fold hiding te": 400, "bare lf": 400, "bare lf at the end": 400, "bare cr": 400, "control byte": 400,
    "space before colon": 400, "no host": 400, "two hosts": 400, "te identity": 400, "te chunked twice": 400,
    "http/2.0": 505, "http/1.2": 505, "te gzip, chunked": 501,
}
CONTROL = [bytes([b]) for b in [*range(0x00, 0x09), *range(0x0a, 0x20), 0x7f]]


@dataclass
class Sent:
    rid: str
    wire: bytes
    method: str
    target: str  # as the engine must see it
    body: Any  # the JSON body the engine must get, or None
    defect: str | None


@st.composite
def one_request(draw: st.DrawFn, last: bool) -> Sent:
    rid = f"d{next(_ids):010d}"  # fixed width: a replayed example has the same lengths
    shape = draw(st.sampled_from(["post", "get", "absolute", "chunked"] + (["http/1.0"] if last else [])))
    defect = draw(st.one_of(st.none(), st.sampled_from(sorted(DEFECTS)))) if draw(st.booleans()) else None
    version = b"HTTP/1.0" if shape == "http/1.0" else b"HTTP/1.1"
    prompt = draw(st.text(alphabet="abc xyz\u00e9\n\"\\", max_size=30))
    body_obj: Any = {"model": "tiny", "prompt": prompt}
    body = json.dumps(body_obj).encode()
    headers = [b"Host: x", b"X-Request-Id: " + rid.encode(), b"Content-Type: application/json"]
    headers += draw(st.lists(st.sampled_from([b"X-A: b", b"Accept: */*", b"User-Agent: fuzz/1.0",
                                              b"x-empty:", b"X-Tab: a\tb"]), max_size=2))
    if shape in ("post", "absolute", "chunked") and draw(st.booleans()):
        headers.append(b"Expect: 100-continue")  # answered by the gateway, never forwarded
    if shape == "get":
        line, payload, body_obj = b"GET /version " + version, b"", None
    elif shape == "chunked":
        line = b"POST /v1/completions " + version
        headers.append(b"Transfer-Encoding: chunked")
        cut = draw(st.integers(0, len(body)))
        pieces = (body[:cut], body[cut:])
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
    else:
        target = b"http://gw.example/v1/completions" if shape == "absolute" else b"/v1/completions"
        line = b"POST " + target + b" " + version
        headers.append(b"Content-Length: %d" % len(body))
        payload = body
    if shape == "http/1.0":
        headers = [h for h in headers if not h.startswith(b"Host")]
        line, payload, body_obj = b"GET /version HTTP/1.0", b"", None
        headers = [h for h in headers if not h.startswith((b"Content-Length", b"Transfer"))]
    if defect is not None:
        line, headers, payload = _inject(draw, defect, line, headers, payload, body)
    draw(st.randoms()).shuffle(headers)
    ends = [b"\r\n"] * (len(headers) + 2)
    if defect == "bare lf":
        ends[draw(st.integers(0, len(ends) - 2))] = b"\n"
    elif defect == "bare lf at the end":
        ends[-1] = b"\n"
    lines = [line, *headers, b""]
    wire = b"".join(part + end for part, end in zip(lines, ends, strict=True)) + payload
    method = line.split(b" ", 1)[0].decode()
    path = "/version" if method == "GET" else "/v1/completions"
    return Sent(rid, wire, method, path, body_obj, defect)


def _inject(draw: st.DrawFn, defect: str, line: bytes, headers: list[bytes], payload: bytes,
            body: bytes) -> tuple[bytes, list[bytes], bytes]:
    chunked_body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    framing = (b"Content-Length", b"Transfer-Encoding")
    plain = [h for h in headers if not h.startswith(framing)]
    if not any(h.startswith(b"Host") for h in plain):  # one defect at a time
        plain.insert(0, b"Host: x")
    if defect in ("cl+te", "te+cl"):
        pair = [b"Content-Length: %d" % draw(st.integers(0, 200)), b"Transfer-Encoding: chunked"]
        pair = pair if defect == "cl+te" else pair[::-1]
        return b"POST /v1/completions HTTP/1.1", plain + pair, chunked_body
    if defect == "two lengths":
        return (b"POST /v1/completions HTTP/1.1",
                [*plain, b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)], body)
    if defect == "the same length twice":
        return (b"POST /v1/completions HTTP/1.1",
                [*plain, b"Content-Length: %d" % len(body), b"Content-Length: %d" % len(body)], body)
    if defect == "fold":
        return line, [*headers, b"X-Folded: a\r\n " + draw(st.sampled_from([b"b", b"", b"\tc"]))], payload
    if defect == "fold hiding te":
        return (b"POST /v1/completions HTTP/1.1",
                [*plain, b"Content-Length: %d" % len(body), b"X-A: b\r\n Transfer-Encoding: chunked"], body)
    if defect == "bare cr":
        after_cr = draw(st.sampled_from([b"b", b"Transfer-Encoding: chunked"]))
        return line, [*headers, b"X-A: a\r" + after_cr], payload
    if defect == "control byte":
        return line, [*headers, b"X-A: a" + draw(st.sampled_from(CONTROL)) + b"b"], payload
    if defect == "space before colon":
        return line, [*headers, draw(st.sampled_from([b"X-A : b", b"Content-Length : 0"]))], payload
    if defect == "no host":
        hostless = [h for h in plain if not h.startswith(b"Host")]
        return line.replace(b"HTTP/1.0", b"HTTP/1.1"), hostless, payload
    if defect == "two hosts":
        return line.replace(b"HTTP/1.0", b"HTTP/1.1"), [*plain, b"Host: y"], b""
    if defect in ("te identity", "te chunked twice", "te gzip, chunked"):
        te = {"te identity": b"identity", "te chunked twice": b"chunked, chunked",
              "te gzip, chunked": b"gzip, chunked"}[defect]
        return b"POST /v1/completions HTTP/1.1", [*plain, b"Transfer-Encoding: " + te], chunked_body
    if defect in ("http/2.0", "http/1.2"):
        return line.rsplit(b" ", 1)[0] + b" " + defect.upper().encode(), headers, payload
    return line, headers, payload  # bare LF: in the line ends


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[list[Sent], list[bytes]]:
    n = draw(st.integers(1, 4))
    sent = [draw(one_request(last=i == n - 1)) for i in range(n)]
    wire = b"".join(s.wire for s in sent)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=6))))
    pieces = [wire[a:b] for a, b in itertools.pairwise([0, *cuts, len(wire)]) if wire[a:b]]
    return sent, pieces


def read_answers(s: socket.socket, want: int) -> tuple[list[tuple[int, bytes]], bool]:
    """Up to `want` answers (status, body); and whether the gateway closed."""
    buf = b""
    answers: list[tuple[int, bytes]] = []
    while len(answers) < want:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].decode("latin-1").lower()
            if head.startswith("http/1.1 100 "):  # the gateway's own 100 Continue
                FIGURES["continues"] = FIGURES.get("continues", 0) + 1
                buf = buf[end + 4:]
                continue
            length = int(head.split("content-length: ", 1)[1].split("\r\n", 1)[0])
            if len(buf) >= end + 4 + length:
                answers.append((int(head.split(" ", 2)[1]), buf[end + 4:end + 4 + length]))
                buf = buf[end + 4 + length:]
                continue
        chunk = s.recv(65536)
        if not chunk:
            return answers, True
        buf += chunk
    assert not buf, f"bytes beyond the answers: {buf[:200]!r}"
    return answers, False


def test_requests_reach_the_engine_exactly_as_a_strict_parser_reads_them(
    gw: tuple[Gateway, EngineLog], request: pytest.FixtureRequest,
) -> None:
    gateway, log = gw
    counts = {"inputs": 0, "requests": 0, "forwarded": 0, "refused": 0}

    @settings(max_examples=REQUEST_EXAMPLES, **SETTINGS)  # type: ignore[arg-type]
    @given(pipelines())
    def one(case: tuple[list[Sent], list[bytes]]) -> None:
        sent, pieces = case
        first_bad = next((i for i, s in enumerate(sent) if s.defect), None)
        good = sent if first_bad is None else sent[:first_bad]
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=ANSWER_TIMEOUT_S) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                for piece in pieces:
                    s.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused and closed already: read what it said
            want = len(good) + (first_bad is not None)
            answers, _closed = read_answers(s, want)
        assert [a[0] for a in answers[:len(good)]] == [200] * len(good), answers
        assert [json.loads(a[1])["id"] for a in answers[:len(good)]] == [g.rid for g in good]
        if first_bad is not None:
            defect = sent[first_bad].defect
            assert len(answers) == want, f"no answer to the defect {defect!r}: {answers}"
            status, body = answers[-1]
            assert status == DEFECTS[defect], (defect, status, body, sent[first_bad].wire)  # type: ignore[index]
            assert json.loads(body)["error"]["message"].startswith("vllm-gateway: ")
        seen = log.new()
        assert [e.get("id") for e in seen] == [g.rid for g in good], (seen, [g.wire for g in sent])
        for entry, g in zip(seen, good, strict=True):
            assert (entry["method"], entry["target"]) == (g.method, g.target)
            if g.body is not None:
                assert json.loads(entry["body"]) == g.body
            assert "expect" not in entry["headers"] and "transfer-encoding" not in entry["headers"]
        counts["inputs"] += 1
        counts["requests"] += len(sent)
        counts["forwarded"] += len(good)
        counts["refused"] += first_bad is not None

    t0 = time.monotonic()
    one()
    assert FIGURES.get("continues"), "no request was answered 100 Continue"
    record(request, "differential requests", seconds=round(time.monotonic() - t0),
           continues=FIGURES["continues"], **counts)
    FIGURES.update({f"request_{k}": v for k, v in counts.items()})


# ---- responses: hostile engine answers, many clients at once ----

GOOD_ANSWERS = ("ok", "chunked", "stray-same", "stray-after", "garbage-after", "interim")
BAD_ANSWERS = ("cl-te", "bad-chunk", "bare-lf", "switch")
CLIENTS = 12


def client(port: int, modes: list[str]) -> list[str]:
    """One client's requests in order on one keep-alive connection (a new
    one after a close); what went wrong, if anything."""
    problems: list[str] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ANSWER_TIMEOUT_S)
    try:
        for mode in modes:
            rid = f"h{next(_ids)}"
            body = json.dumps({"model": "tiny", "prompt": mode}).encode()
            conn.request("POST", "/v1/completions", body=body, headers={
                "Content-Type": "application/json", "X-Request-Id": rid, "X-Hostile": mode})
            resp = conn.getresponse()
            try:
                data = resp.read()
            except http.client.IncompleteRead as e:
                conn.close()
                if mode != "truncated" or (e.partial and rid.encode() not in e.partial):
                    problems.append(f"{mode}: cut short: {e.partial[:200]!r}")
                continue
            ids = [m.decode() for m in _ids_in(data)]
            if mode in GOOD_ANSWERS:
                if resp.status != 200 or ids != [rid] or b"stray" in data:
                    problems.append(f"{mode} {rid}: {resp.status} {data[:200]!r}")
            elif resp.status != 502 or json.loads(data)["error"]["type"] != "upstream_error" or ids:
                problems.append(f"{mode} {rid}: {resp.status} {data[:200]!r}")
            if resp.will_close:
                conn.close()
    finally:
        conn.close()
    return problems


def _ids_in(data: bytes) -> list[bytes]:
    return re.findall(rb'"id": "([^"]+)"', data)


def test_clients_get_only_their_own_answers_from_a_hostile_engine(
    gw: tuple[Gateway, EngineLog], request: pytest.FixtureRequest,
) -> None:
    gateway, log = gw
    counts = {"inputs": 0, "exchanges": 0}
    mode = st.sampled_from([*GOOD_ANSWERS, *BAD_ANSWERS, "truncated"])

    @settings(max_examples=RESPONSE_EXAMPLES, **SETTINGS)  # type: ignore[arg-type]
    @given(st.lists(st.lists(mode, min_size=1, max_size=4), min_size=CLIENTS, max_size=CLIENTS))
    def one(scripts: list[list[str]]) -> None:
        with ThreadPoolExecutor(CLIENTS) as pool:
            problems = [p for found in pool.map(client, [gateway.port] * CLIENTS, scripts) for p in found]
        seen = [e.get("id") for e in log.new() if "id" in e]
        assert not problems, problems
        assert len(seen) == len(set(seen)) == sum(map(len, scripts)), "a request reached the engine twice"
        counts["inputs"] += 1
        counts["exchanges"] += sum(map(len, scripts))

    t0 = time.monotonic()
    one()
    record(request, "differential responses", seconds=round(time.monotonic() - t0), clients=CLIENTS,
           **counts)
    FIGURES.update({f"response_{k}": v for k, v in counts.items()})
