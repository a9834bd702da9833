"""The chunked pass-through: whole, byte by byte, any split, with trailing
data; any input either passes or raises ChunkedError."""

from __future__ import annotations

from contextlib import nullcontext as _nothing

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shim.chunked import ChunkedDecoder, ChunkedError, ChunkedPassthrough, chunk_data


def encode(chunks: list[bytes], trailers: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n" + trailers + b"\r\n"


def run(pieces: list[bytes]) -> tuple[bytes, ChunkedPassthrough]:
    p = ChunkedPassthrough()
    out = b""
    for piece in pieces:
        if p.done:
            break
        out += p.feed(piece)
    return out, p


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def decode_like_h11(body_without_last_chunk: bytes) -> bytes:
    """What a client decodes from the forwarded bytes plus our own last chunk."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                      + body_without_last_chunk + b"0\r\n\r\n")
    out = b""
    while True:
        ev = conn.next_event()
        if isinstance(ev, h11.Data):
            out += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            return out
        elif ev is h11.NEED_DATA:
            raise AssertionError("incomplete")


CHUNKS = [b"data: {\"a\": 1}\n\n", b"x" * 300, b"\r\n\r\n", b"data: [DONE]\n\n"]


def test_whole_input_at_once() -> None:
    data = encode(CHUNKS)
    out, p = run([data])
    assert p.done and p.leftover == b""
    assert out == data[: data.rindex(b"0\r\n\r\n")]
    assert out is not None and decode_like_h11(out) == b"".join(CHUNKS)


def test_whole_chunks_are_passed_without_a_copy() -> None:
    p = ChunkedPassthrough()
    piece = encode([b"hello"])[:-5]  # without the last chunk
    assert p.feed(piece) is piece


EVENTS = [b'data: {"n": %d}\n\n' % i for i in range(50)] + [b"data: [DONE]\n\n"]


@pytest.mark.parametrize("upper", [False, True])
def test_a_whole_event_stream_in_one_read(upper: bool) -> None:
    # the common read: whole chunks without CRLF in their data, then the last chunk
    wire = b"".join((b"%X\r\n" if upper else b"%x\r\n") % len(e) + e + b"\r\n" for e in EVENTS)
    p = ChunkedPassthrough()
    assert p.feed(wire) is wire
    assert p.feed(b"000\r\n\r\n") == b"" and p.done and p.leftover == b""
    d = ChunkedDecoder()
    assert d.feed(wire + b"0\r\n\r\n") == b"".join(EVENTS)
    assert d.done and d.leftover == b""


def test_a_paced_stream_one_chunk_a_read() -> None:
    # an engine writes each event on its own: each read is one whole chunk,
    # passed on as it is (CRLFs in the data included) and decoded exactly
    events = [*EVENTS[:3], b"a\r\n\r\nb", b"x" * 4096]
    p, d = ChunkedPassthrough(), ChunkedDecoder()
    for e in events:
        piece = b"%x\r\n%s\r\n" % (len(e), e)
        assert p.feed(piece) is piece
        assert d.feed(piece) == e
    assert p.feed(b"0\r\n\r\n") == b"" and p.done
    assert d.feed(b"0\r\n\r\n") == b"" and d.done


@pytest.mark.parametrize("bad", [b"5\r\nhelloXX", b"5\r\nhell\r\n\r\n", b"4\r\nhello\r\n"])
def test_one_chunk_a_read_with_a_wrong_size_is_an_error(bad: bytes) -> None:
    for reader in (ChunkedPassthrough(), ChunkedDecoder()):
        with pytest.raises(ChunkedError):
            reader.feed(bad)
            reader.feed(b"0\r\n\r\n")


@pytest.mark.parametrize("after", [b"5\r\nhello\r\n", b"0\r\n\r\n", b"HTTP/1.1 200 OK\r\n"])
def test_what_follows_the_last_chunk_is_left_over(after: bytes) -> None:
    # bytes past the body that look like chunks too must not be taken as body
    wire = encode([b"hello", b"world"]) + after
    out, p = run([wire])
    assert p.done and p.leftover == after and decode_like_h11(out) == b"helloworld"
    d = ChunkedDecoder()
    assert d.feed(wire) == b"helloworld" and d.done and d.leftover == after


def test_byte_by_byte() -> None:
    data = encode(CHUNKS, b"x-trailer: 1\r\n")
    out, p = run([data[i:i + 1] for i in range(len(data))])
    assert p.done
    assert decode_like_h11(out) == b"".join(CHUNKS)


def test_trailing_data_after_the_body_is_left_over() -> None:
    data = encode(CHUNKS) + b"HTTP/1.1 200 OK\r\n"
    out, p = run([data])
    assert p.done and p.leftover == b"HTTP/1.1 200 OK\r\n"
    assert decode_like_h11(out) == b"".join(CHUNKS)


def test_extensions_and_trailers() -> None:
    data = b"5;name=value\r\nhello\r\n0;x=y\r\nTrailer: a\r\n\r\n"
    out, p = run([data])
    assert p.done and decode_like_h11(out) == b"hello"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=70), max_size=8), st.lists(st.integers(0, 10_000), max_size=12),
       st.booleans())
def test_any_split_gives_the_same_body(chunks: list[bytes], cuts: list[int], trailers: bool) -> None:
    data = encode(chunks, b"t: v\r\n" if trailers else b"")
    out, p = run(split(data, cuts))
    assert p.done
    assert decode_like_h11(out) == b"".join(chunks)


@pytest.mark.parametrize("bad", [
    b"zz\r\nhello\r\n", b"5\r\nhelloXX", b"-5\r\n", b"5\r\nhello\r\n0\r\n\r\nmore",
    b"+5\r\nhello\r\n", b"1_0\r\n", b"\r\n",
])
def test_malformed_raises_our_error(bad: bytes) -> None:
    p = ChunkedPassthrough()
    with pytest.raises(ChunkedError):
        p.feed(bad)
        p.feed(b"more")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_any_input_passes_or_raises_chunked_error(pieces: list[bytes]) -> None:
    p = ChunkedPassthrough()
    try:
        for piece in pieces:
            p.feed(piece)
    except ChunkedError:
        pass


# chunk-size lines and trailers that h11 refuses: relayed raw once, they
# must be errors here too, however the bytes are split
H11_REFUSES = [
    b"0x4c\r\n" + b"a" * 76 + b"\r\n0\r\n\r\n",
    b" 55\r\n" + b"a" * 85 + b"\r\n0\r\n\r\n",
    b"5\nhello\r\n0\r\n\r\n",
    b"5\r\r\nhello\r\n0\r\n\r\n",
    b"5 x\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhello\r\n0\n\r\n",
    b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
]


# and stricter than h11: no control byte in an extension,
# and no bare LF in trailers
STRICTER = [b"5;a\x00\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\nT: a\n\r\n",
            b"5\r\nhello\r\n0\r\n\n"]


@pytest.mark.parametrize("bad", H11_REFUSES + STRICTER)
@pytest.mark.parametrize("whole", [True, False])
def test_what_h11_refuses_is_an_error_in_both_readers(bad: bytes, whole: bool) -> None:
    with pytest.raises(h11.RemoteProtocolError) if bad not in STRICTER else _nothing():
        c = h11.Connection(h11.CLIENT)
        c.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        c.send(h11.EndOfMessage())
        c.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + bad)
        while c.next_event() is not h11.NEED_DATA:
            pass
    pieces = [bad] if whole else [bad[i:i + 1] for i in range(len(bad))]
    for reader in (ChunkedPassthrough(), ChunkedDecoder()):
        with pytest.raises(ChunkedError):
            for piece in pieces:
                reader.feed(piece)
            reader.feed(b"")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=70), min_size=1, max_size=8), st.booleans())
def test_a_read_of_whole_chunks_gives_their_data_or_none(chunks: list[bytes], last: bool) -> None:
    # What the relay thread rewrites at once: whole chunks and nothing else.
    # A read with the last chunk, or one the fast check cannot take (CRLF in
    # a chunk's data), is None: the task's decoder handles it.
    wire = encode(chunks) if last else encode(chunks)[:-len(b"0\r\n\r\n")]
    got = chunk_data(wire)
    if last or not any(chunks):
        assert got is None
    elif not any(b"\r\n" in c or c.endswith(b"\r") or c.startswith(b"\n") for c in chunks):
        assert got == b"".join(chunks)
    else:
        assert got in (None, b"".join(chunks))


@pytest.mark.parametrize("read", [b"5\r\nhel", b"5\r\nhello\r\n5\r\nwor", b"zz\r\nhello\r\n",
                                  b"5\r\nhello\r\n0\r\n\r\n", b"5;x=y\r\nhello\r\n"])
def test_a_read_that_is_not_whole_chunks_only_is_none(read: bytes) -> None:
    assert chunk_data(read) is None
