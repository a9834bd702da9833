"""shim/http1.py against h11 itself: whatever bytes come in, in whatever
pieces, the fast connections must report what h11 reports (events, errors,
states), except where shim/headcheck.py refuses a head that h11 would take
(the gateway is stricter on purpose); and what they send must read back the
same through h11."""

from __future__ import annotations

import os
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shim import headcheck
from shim.chunked import ChunkedDecoder, ChunkedError
from shim.http1 import ServerConnection, UpstreamConnection

MAX_HEAD = 2048
# HTTP1_EXAMPLES=5000 for a longer search
SETTINGS = settings(max_examples=int(os.environ.get("HTTP1_EXAMPLES", "400")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return [p for p in pieces if p]


def _norm(event: Any) -> Any:
    if isinstance(event, h11.Request):
        return ("request", event.method, event.target, list(event.headers), event.http_version)
    if isinstance(event, h11.Response):
        return ("response", event.status_code, list(event.headers), event.reason)
    if isinstance(event, h11.Data):
        return ("data", bytes(event.data))
    if isinstance(event, h11.EndOfMessage):
        return ("end",)
    if isinstance(event, h11.ConnectionClosed):
        return ("closed",)
    return event


def _drain(conn: h11.Connection, pieces: list[bytes], eof: bool, cycles: int = 3) -> list[Any]:
    """Feed the pieces; collect events (data joined) through up to `cycles`
    complete requests; an error ends the list."""
    out: list[Any] = []
    pieces = list(pieces)
    data: list[bytes] = []

    def flush() -> None:
        if data:
            out.append(("data", b"".join(data)))
            data.clear()

    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            flush()
            out.append(("error", e.error_status_hint))
            return out
        if event is h11.NEED_DATA:
            if pieces:
                conn.receive_data(pieces.pop(0))
                continue
            if eof:
                eof = False
                conn.receive_data(b"")
                continue
            flush()
            out.append(("need-data",))
            return out
        if isinstance(event, h11.Data):
            data.append(bytes(event.data))
            continue
        flush()
        out.append(_norm(event))
        if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            return out
        if isinstance(event, h11.EndOfMessage):
            cycles -= 1
            if cycles == 0:
                return out
            # answer, so that the next request on the connection can be read
            conn.send(h11.Response(status_code=404, headers=[(b"content-length", b"0")]))
            conn.send(h11.EndOfMessage())
            out.append(("states", conn.our_state, conn.their_state))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return out
            conn.start_next_cycle()


STRICTER = (400, 431, 501, 505)  # what headcheck answers to heads that h11 may take


def _same_as_h11(wire: bytes, cuts: list[int], eof: bool) -> None:
    """The same events as h11, up to where our checks refuse a head that h11
    took: then the events before it are the same, and the error is one of
    our own refusals."""
    ours = _drain(ServerConnection(max_incomplete_event_size=MAX_HEAD), _split(wire, cuts), eof)
    theirs = _drain(h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD), _split(wire, cuts), eof)
    if ours[-1][0] == "error" and ours != theirs:
        assert ours[:-1] == theirs[:len(ours) - 1]
        assert ours[-1][1] in STRICTER
        return
    assert ours == theirs


PLAIN = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 11\r\n\r\n{\"a\": true}"
)

# Pieces of request heads, usual and not: the fast path must take the usual
# ones and leave every other one to h11 with the same outcome.
request_lines = st.sampled_from([
    b"POST /v1/chat/completions HTTP/1.1", b"GET /health HTTP/1.1", b"HEAD /health HTTP/1.1",
    b"GET /x?y=1 HTTP/1.0", b"CONNECT a:1 HTTP/1.1", b"GET  / HTTP/1.1", b"GET / HTTP/2.0",
    b"G\x00T / HTTP/1.1", b"GET /\xff HTTP/1.1", b"", b"GET / http/1.1", b"GET /",
])
header_lines = st.sampled_from([
    b"Host: x", b"host:x", b"Host: x", b"Content-Length: 5", b"content-length: 0", b"Content-Length: 05",
    b"Content-Length: 5, 5", b"Content-Length: -1", b"Content-Length: 1x", b"Content-Length:  3 ",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip", b"Expect: 100-continue",
    b"Connection: close", b"Connection: keep-alive", b"connection: Keep-Alive, Close", b"Upgrade: h2c",
    b"X-A: b\x01c", b"X-A: \xe9t\xe9", b"X-A:", b"X-A : b", b" folded", b"\tfolded", b"X-A: b\rc",
    b"X-A: b\nc", b"Authorization: Bearer k", b"X-Request-Id: abc", b"bad header", b"X-" + b"a" * 3000,
])
line_ends = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    parts = [draw(request_lines)]
    parts += draw(st.lists(header_lines, max_size=6))
    ends = [draw(line_ends) for _ in parts]
    head = b"".join(p + e for p, e in zip(parts, ends, strict=True)) + draw(line_ends)
    return head + draw(st.sampled_from([b"", b"hello", b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"x" * 40]))


@SETTINGS
@given(st.lists(requests(), min_size=1, max_size=3), st.lists(st.integers(0, 10_000), max_size=6),
       st.booleans())
@example([PLAIN, PLAIN], [], False)
@example([PLAIN], [7, 30, 100], True)
def test_requests_read_like_h11(wires: list[bytes], cuts: list[int], eof: bool) -> None:
    _same_as_h11(b"".join(wires), cuts, eof)


@SETTINGS
@given(st.binary(max_size=300), st.lists(st.integers(0, 1000), max_size=4), st.booleans())
def test_any_bytes_read_like_h11(wire: bytes, cuts: list[int], eof: bool) -> None:
    _same_as_h11(wire, cuts, eof)


def test_plain_requests_take_the_fast_path() -> None:
    conn = ServerConnection(max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(PLAIN + PLAIN.replace(b"POST", b"PUT"))
    events = []
    for _ in range(2):
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            events.append(event)
        conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"2")]))
        conn.send(h11.Data(data=b"ok"))
        conn.send(h11.EndOfMessage())
        conn.start_next_cycle()
    assert not conn.h11
    assert [e.method for e in events if isinstance(e, h11.Request)] == [b"POST", b"PUT"]


def test_chunked_requests_go_to_h11_for_one_exchange() -> None:
    conn = ServerConnection(max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + PLAIN)
    assert isinstance(conn.next_event(), h11.Request)
    assert conn.h11
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
    conn.send(h11.EndOfMessage())
    conn.start_next_cycle()
    assert not conn.h11  # the next request is ours again, and checked first
    assert isinstance(conn.next_event(), h11.Request)
    assert not conn.h11


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: \x01\r\n\r\n",
])
def test_an_h11_exchange_does_not_let_the_next_head_skip_the_checks(head: bytes) -> None:
    first = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    conn = ServerConnection(max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(first + head + b"0\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
    conn.send(h11.EndOfMessage())
    conn.start_next_cycle()
    with pytest.raises(h11.RemoteProtocolError) as e:
        conn.next_event()
    assert e.value.error_status_hint == 400


def test_expect_100_continue_is_answered_once_the_server_asks() -> None:
    conn = ServerConnection(max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    req = conn.next_event()
    assert isinstance(req, h11.Request)
    assert conn.client_is_waiting_for_100_continue
    interim = conn.send(h11.InformationalResponse(status_code=100, headers=[]))
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert not conn.client_is_waiting_for_100_continue
    conn.receive_data(b"{}")
    assert conn.next_event() == h11.Data(data=b"{}")
    assert isinstance(conn.next_event(), h11.EndOfMessage)


def test_an_answer_before_the_expected_body_closes_the_connection() -> None:
    conn = ServerConnection(max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    conn.next_event()
    head = conn.send(h11.Response(status_code=401, headers=[(b"content-length", b"0")]))
    assert b"Connection: close" in head
    conn.send(h11.EndOfMessage())
    assert conn.our_state is h11.MUST_CLOSE


@pytest.mark.parametrize("chunked", [False, True])
def test_absolute_form_targets_are_routed_by_their_path(chunked: bool) -> None:
    conn = ServerConnection(max_incomplete_event_size=MAX_HEAD)
    framing = b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" if chunked else b"Content-Length: 0\r\n\r\n"
    conn.receive_data(b"POST http://h:1/v1/chat/completions?a=b HTTP/1.1\r\nHost: x\r\n" + framing)
    req = conn.next_event()
    assert isinstance(req, h11.Request)
    assert req.target == b"/v1/chat/completions?a=b"


def test_a_whole_head_over_the_limit_is_431_even_in_one_piece() -> None:
    conn = ServerConnection(max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 3000 + b"\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError) as e:
        conn.next_event()
    assert e.value.error_status_hint == 431


def test_long_incomplete_head_is_431() -> None:
    conn = ServerConnection(max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(b"GET / HTTP/1.1\r\nX-A: " + b"a" * 3000)
    with pytest.raises(h11.RemoteProtocolError) as e:
        conn.next_event()
    assert e.value.error_status_hint == 431


# ---- what the server sends ----

response_headers = st.lists(st.sampled_from([
    (b"content-type", b"application/json"), (b"connection", b"close"), (b"Connection", b"keep-alive"),
    (b"x-a", b"b"), (b"transfer-encoding", b"chunked"),
]), max_size=3, unique=True)


@SETTINGS
@given(
    method=st.sampled_from([b"GET", b"POST", b"HEAD"]),
    close=st.booleans(),
    status=st.sampled_from([200, 201, 204, 304, 400, 404, 503]),
    headers=response_headers,
    body=st.lists(st.binary(min_size=0, max_size=20), max_size=3),
    length=st.booleans(),
)
def test_responses_write_like_h11(method: bytes, close: bool, status: int, headers: list[tuple[bytes, bytes]],
                                  body: list[bytes], length: bool) -> None:
    wire = method + b" /x HTTP/1.1\r\nHost: x\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n"
    if method == b"HEAD" or status in (204, 304):
        body = []
    if length and not any(n == b"transfer-encoding" for n, _ in headers):
        headers = [*headers, (b"content-length", str(sum(map(len, body))).encode())]
    outputs = []
    for conn in (ServerConnection(), h11.Connection(h11.SERVER)):
        conn.receive_data(wire)
        assert isinstance(conn.next_event(), h11.Request)
        assert isinstance(conn.next_event(), h11.EndOfMessage)
        out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        for piece in body:
            out += conn.send(h11.Data(data=piece)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        outputs.append((_read_response(out, method), conn.our_state, conn.their_state))
    assert outputs[0] == outputs[1]


def _read_response(wire: bytes, method: bytes) -> Any:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/x", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(wire)
    events = []
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(b"")
            continue
        if isinstance(event, h11.Response):
            events.append(("response", event.status_code,
                           sorted((n, v.lower() if n == b"connection" else v) for n, v in event.headers)))
        else:
            events.append(_norm(event))
        if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return events


def test_sending_past_content_length_is_refused() -> None:
    conn = ServerConnection()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    conn.send_head(200, [(b"content-length", b"2")])
    with pytest.raises(h11.LocalProtocolError):
        conn.send_data(b"abc")
    assert conn.our_state is h11.ERROR


# ---- the engine side ----

def _engine_events(conn: h11.Connection, pieces: list[bytes], eof: bool) -> list[Any]:
    return _drain(conn, pieces, eof, cycles=1)


response_starts = st.sampled_from([
    b"HTTP/1.1 200 OK", b"HTTP/1.1 200 ", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 100 Continue", b"HTTP/1.0 200 OK", b"HTTP/1.1 200", b"HTTP/1.1 2000 OK", b"HTTP/1.1 500 \xff",
])
response_lines = st.sampled_from([
    b"content-type: text/event-stream", b"content-length: 5", b"Content-Length: 0", b"content-length: 5, 5",
    b"transfer-encoding: chunked", b"Transfer-Encoding: CHUNKED", b"transfer-encoding: gzip, chunked",
    b"connection: close", b"date: Mon", b"x: \x7f", b"bad",
])
bodies = st.sampled_from([
    b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n", b"3\r\nabc\r\n",
    b"5\r\nhelloXX0\r\n\r\n", b"zz\r\n", b"0\r\n\r\nHTTP/1.1 200 OK\r\n",
    b"10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
])


@SETTINGS
@given(response_starts, st.lists(response_lines, max_size=4), st.sampled_from([b"\r\n", b"\n"]), bodies,
       st.sampled_from([b"GET", b"POST", b"HEAD"]), st.lists(st.integers(0, 1000), max_size=5), st.booleans())
def test_responses_read_like_h11(start: bytes, lines: list[bytes], eol: bytes, body: bytes, method: bytes,
                                 cuts: list[int], eof: bool) -> None:
    """What h11 reads, where our rules take the response; an error where
    they refuse it (h11 is laxer: CL with TE, bare LF, loose chunk lines).
    Interim 1xx answers are skipped, and 204, 304 and answers to HEAD lose
    their framing headers."""
    wire = start + eol + b"".join(line + eol for line in lines) + eol + body
    headers = [(b"host", b"127.0.0.1:1"), (b"content-length", b"2")]
    ours = UpstreamConnection()
    ours.send_request(method, b"/v1/x", headers, b"{}")
    theirs = h11.Connection(h11.CLIENT)
    theirs.send(h11.Request(method=method, target=b"/v1/x", headers=headers))
    theirs.send(h11.Data(data=b"{}"))
    theirs.send(h11.EndOfMessage())
    a = _engine_events(ours, _split(wire, cuts), eof)
    b = [e for e in _engine_events(theirs, _split(wire, cuts), eof)
         if not isinstance(e, h11.InformationalResponse)]
    if b and b[0][0] == "response" and (b[0][1] in (204, 304) or method == b"HEAD"):
        b[0] = (*b[0][:2], [(n, v) for n, v in b[0][2] if n not in (b"content-length", b"transfer-encoding")],
                b[0][3])
    if a[-1][0] == "error" and a != b:
        assert a[0] == ("error", 400) or a[0] == b[0]  # the head, when ours took it
        assert _we_refuse(wire, method), (wire, a, b)
        return
    assert a == b


def _we_refuse(wire: bytes, method: bytes) -> bool:
    """Whether our rules refuse this response (its head, status or chunks)."""
    end = wire.find(b"\r\n\r\n")
    try:
        if headcheck.head_end(wire, 16 * 1024) is None:
            return True  # incomplete (cut by the close)
        head = headcheck.check_response(wire[:end + 4])
        if head.status < 200:
            return True
        if head.chunked and method != b"HEAD" and head.status not in (204, 304):
            d = ChunkedDecoder()
            d.feed(wire[end + 4:])
            d.feed(b"")
            return not d.done
    except (headcheck.HeadError, ChunkedError):
        return True
    return False


def test_request_bytes_match_h11() -> None:
    headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
               (b"content-length", b"2")]
    theirs = h11.Connection(h11.CLIENT)
    wire = theirs.send(h11.Request(method=b"POST", target=b"/v1/x?a=b", headers=headers)) or b""
    wire += (theirs.send(h11.Data(data=b"{}")) or b"") + (theirs.send(h11.EndOfMessage()) or b"")
    assert UpstreamConnection().send_request(b"POST", b"/v1/x?a=b", headers, b"{}") == wire


# ---- chunked decoding ----

@SETTINGS
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=6), st.lists(st.integers(0, 400), max_size=6),
       st.booleans(), st.binary(max_size=8))
def test_chunked_decoder_any_split(chunks: list[bytes], cuts: list[int], upper: bool, after: bytes) -> None:
    wire = b"".join((b"%X" if upper else b"%x") % len(c) + b"\r\n" + c + b"\r\n" for c in chunks)
    wire += b"0\r\n\r\n" + after
    d = ChunkedDecoder()
    out = b""
    for piece in _split(wire, cuts):
        if d.done:
            break
        out += d.feed(piece)
    assert d.done
    assert out == b"".join(chunks)
    rest = wire[len(wire) - len(after):]
    assert rest.startswith(d.leftover)


@pytest.mark.parametrize("wire", [b"x\r\n", b"5\r\nhelloXX", b"-1\r\n", b"+5\r\n", b"1_0\r\n", b"a" * 2000])
def test_chunked_decoder_refuses_bad_framing(wire: bytes) -> None:
    d = ChunkedDecoder()
    with pytest.raises(ChunkedError):
        d.feed(wire)  # bad framing after good data: the data, then the error
        d.feed(b"")
