"""shim/headcheck.py: the gateway's rules for heads, fed whole, byte by byte,
split anywhere and with data after the head; any bytes either pass or raise
HeadError."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shim.headcheck import (
    HeadError,
    RequestHead,
    check_request,
    check_response,
    check_start,
    head_end,
    origin_form,
)

MAX = 64 * 1024
GOOD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"


def feed(pieces: list[bytes], max_bytes: int = MAX) -> RequestHead | None:
    """As the server reads: grow a buffer, look for the head's end after each
    piece (passing what was found clean before), check it once whole."""
    buf = b""
    checked = 0
    for piece in pieces:
        buf += piece
        end = head_end(buf, max_bytes, checked)
        if end is not None:
            return check_request(buf[:end])
        check_start(buf)
        checked = len(buf)
    return None


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def outcome(pieces: list[bytes], max_bytes: int = MAX) -> object:
    try:
        return feed(pieces, max_bytes)
    except HeadError as e:
        return ("refused", e.status)


REFUSED = {
    "CL and TE": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    "TE and CL": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
    "two lengths": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    "the same length twice": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    "a length list": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n",
    "a signed length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
    "TE not ending in chunked": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "TE identity": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
    "chunked twice": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n",
    "TE in HTTP/1.0": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
    "obs-fold": b"POST / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n\r\n",
    "obs-fold by tab": b"POST / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n\tc\r\n\r\n",
    "bare LF in a line end": b"POST / HTTP/1.1\r\nHost: x\nTransfer-Encoding: chunked\r\n\r\n",
    "bare LF ending the head": b"GET / HTTP/1.1\r\nHost: x\r\n\n",
    "bare CR": b"GET / HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n",
    "bare CR in the request line": b"GET /a\rb HTTP/1.1\r\nHost: x\r\n\r\n",
    "NUL in a value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "0x01 in a value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
    "DEL in a value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n",
    "VT in a value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x0bb\r\n\r\n",
    "space before the colon": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n",
    "no Host": b"GET / HTTP/1.1\r\n\r\n",
    "two Hosts": b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "lower-case version": b"GET / http/1.1\r\nHost: x\r\n\r\n",
    "a leading empty line": b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "a non-ASCII target": b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("head", list(REFUSED.values()), ids=list(REFUSED))
@pytest.mark.parametrize("how", ["whole", "byte by byte", "with trailing data"])
def test_ambiguous_heads_are_400(head: bytes, how: str) -> None:
    pieces = {"whole": [head], "byte by byte": [head[i:i + 1] for i in range(len(head))],
              "with trailing data": [head + b"0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n"]}[how]
    assert outcome(pieces) == ("refused", 400)


@pytest.mark.parametrize("version", [b"2.0", b"1.2", b"0.9", b"9.9", b"3.0"])
def test_other_versions_are_505(version: bytes) -> None:
    assert outcome([b"GET / HTTP/" + version + b"\r\nHost: x\r\n\r\n"]) == ("refused", 505)


def test_other_codings_before_chunked_are_501() -> None:
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    assert outcome([head]) == ("refused", 501)


@pytest.mark.parametrize("whole", [True, False])
def test_heads_over_the_limit_are_431_however_they_arrive(whole: bool) -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 2000 + b"\r\n\r\n"
    pieces = [head] if whole else [head[i:i + 100] for i in range(0, len(head), 100)]
    assert outcome(pieces, 1024) == ("refused", 431)
    assert outcome([head[:1500]], 1024) == ("refused", 431)  # incomplete, already too long


def test_plain_heads_pass() -> None:
    head = feed([GOOD + b"{}"])
    assert head is not None
    assert (head.method, head.target, head.version, head.length, head.chunked) == (
        b"POST", b"/v1/chat/completions", b"1.1", 2, False)
    assert head.keep_alive and not head.expect_continue
    head = feed([b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\nExpect: 100-Continue\r\n"
                 b"Connection: close\r\n\r\n"])
    assert head is not None and head.chunked and head.expect_continue and not head.keep_alive
    head = feed([b"GET / HTTP/1.0\r\n\r\n"])
    assert head is not None and not head.keep_alive


@pytest.mark.parametrize(("target", "path"), [
    (b"http://host/v1/chat/completions", b"/v1/chat/completions"),
    (b"HTTP://host:8000/v1/models?x=1", b"/v1/models?x=1"),
    (b"https://h?q", b"/?q"),
    (b"http://h", b"/"),
    (b"/plain", b"/plain"),
    (b"*", b"*"),
])
def test_absolute_form_is_reduced_to_its_path(target: bytes, path: bytes) -> None:
    assert origin_form(target) == path


def test_absolute_form_without_host_is_refused() -> None:
    with pytest.raises(HeadError):
        origin_form(b"http:///x")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([GOOD, *REFUSED.values()]), st.lists(st.integers(0, 400), max_size=8),
       st.binary(max_size=30))
def test_any_split_gives_the_same_answer(head: bytes, cuts: list[int], after: bytes) -> None:
    whole = outcome([head + after])
    assert outcome(splits(head + after, cuts)) == whole
    assert outcome([head[i:i + 1] for i in range(len(head))] + [after]) == whole


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 300), max_size=5))
def test_any_bytes_pass_or_raise_head_error(data: bytes, cuts: list[int]) -> None:
    outcome(splits(data, cuts))  # HeadError is caught; anything else fails the test
    try:
        check_response(data + b"\r\n\r\n")
    except HeadError:
        pass


RESPONSES_REFUSED = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/2.0 200 OK\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: \x01\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
]


@pytest.mark.parametrize("head", RESPONSES_REFUSED)
def test_ambiguous_responses_are_refused(head: bytes) -> None:
    with pytest.raises(HeadError):
        check_response(head)


def test_plain_responses_pass() -> None:
    r = check_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    assert (r.status, r.chunked, r.length, r.keep_alive) == (200, True, None, False)
    r = check_response(b"HTTP/1.1 204 \r\n\r\n")
    assert (r.status, r.reason) == (204, b"")
