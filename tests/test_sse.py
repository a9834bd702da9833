from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shim.sse import SSEDecoder


def split_all(data: bytes, cuts: list[int]) -> tuple[list[bytes], bytes]:
    decoder = SSEDecoder()
    events: list[bytes] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        events += decoder.feed(data[start:cut])
        start = max(start, cut)
    return events, decoder.end()


STREAM = (
    b'data: {"a": 1}\n\n'
    b": keep-alive\n\n"
    b'data: {"b": "\xe6\x9d\xb1"}\r\n\r\n'
    b"event: x\ndata: y\n\n"
    b"data: [DONE]\n\n"
)


def test_whole() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(STREAM) == [
        b'data: {"a": 1}\n\n',
        b": keep-alive\n\n",
        b'data: {"b": "\xe6\x9d\xb1"}\r\n\r\n',
        b"event: x\ndata: y\n\n",
        b"data: [DONE]\n\n",
    ]
    assert decoder.end() == b""


def test_byte_by_byte() -> None:
    decoder = SSEDecoder()
    events = [e for i in range(len(STREAM)) for e in decoder.feed(STREAM[i : i + 1])]
    assert events == SSEDecoder().feed(STREAM)


def test_trailing_data() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: 1\n\ndata: 2\n") == [b"data: 1\n\n"]
    assert decoder.feed(b"") == []
    assert decoder.end() == b"data: 2\n"
    assert decoder.end() == b""


def test_crlf_and_stray_empty_lines() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"\r\ndata: 1\r\n\r\n\n") == [b"\r\n", b"data: 1\r\n\r\n", b"\n"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"data: x", b"\n", b"\r\n", b": c", b"\xe6\x9d", b"\r"])),
    st.lists(st.integers(0, 200), max_size=8),
)
def test_any_split_same_events(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    whole = SSEDecoder()
    expected = whole.feed(data), whole.end()
    got = split_all(data, [c for c in cuts if c <= len(data)])
    assert got == expected
    events, rest = got
    assert b"".join(events) + rest == data


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"data: x", b"\n", b"\r\n", b": c", b"\r"])),
    st.lists(st.sampled_from([b"data: x", b"\n", b"\r\n", b": c", b"\r"])),
)
def test_whole_means_feed_returns_all(before: list[bytes], parts: list[bytes]) -> None:
    decoder = SSEDecoder()
    decoder.feed(b"".join(before))
    data = b"".join(parts)
    if decoder.whole(data):
        assert b"".join(decoder.feed(data)) == data
        assert decoder.end() == b""
