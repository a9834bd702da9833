"""The relay thread's C part (shim/_relay.c): its checks take exactly what
the Python steps would pass unchanged, and its thread keeps the relay
thread's contract on socket pairs."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from shim import relay as relaying
from shim.chunked import ChunkedPassthrough, chunk_data, whole_chunks_only
from shim.relay import NativeRelay
from shim.sse import SSEDecoder
from shim.toolcalls import StreamRewriter, get_format
from tests.relay_util import STEP_S, Pairs, assert_left_alone, read_exactly, socket_pairs

try:
    from shim import _relay
except ImportError:  # pragma: no cover - a build without a C compiler
    _relay = None  # type: ignore[assignment]



needs_c = pytest.mark.skipif(_relay is None, reason="shim/_relay.c is not built")
pytestmark = needs_c

TRIGGERS = StreamRewriter(get_format("nemotron")).plain_triggers()  # type: ignore[arg-type]


def frame(chunks: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)


# -- the checks --------------------------------------------------------------

reads = st.one_of(
    st.binary(max_size=80),
    st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=5).map(frame),
    st.tuples(st.lists(st.binary(max_size=40), min_size=1, max_size=5), st.integers(0, 200),
              st.booleans(), st.booleans()).map(
        lambda t: (frame(t[0]) + (b"0\r\n\r\n" if t[2] else b""))[: t[1] if t[3] else None]),
)


@settings(max_examples=500, deadline=None)
@given(reads)
def test_raw_takes_what_the_python_step_takes_and_only_whole_chunks(read: bytes) -> None:
    got = _relay.check(read, _relay.RAW)
    if whole_chunks_only(read):
        assert got == read
    if got is not None:
        # what it passes leaves a reader between chunks, none of them the last
        assert got == read
        p = ChunkedPassthrough()
        assert p.feed(read) == read and p.idle and not p.done


@pytest.mark.parametrize("read", [b"", b"0\r\n\r\n", b"5\r\nhel", b"5\r\nhello\r\n0\r\n\r\n",
                                  b"5;x=y\r\nhello\r\n", b"zz\r\nhello\r\n", b"5\r\nhelloXY",
                                  b"10000000000000000\r\nx\r\n", b"ffffffffffffffff\r\nx\r\n"])
def test_raw_gives_back_anything_but_whole_chunks(read: bytes) -> None:
    assert _relay.check(read, _relay.RAW) is None


def event(content: str) -> bytes:
    return (b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":%s}}]}\n\n'
            % content.encode())


contents = st.sampled_from(['" word"', '"<TOOL"', '"\\u003cTOOLCALL>"', '"\\u003CT"', '"a\\nb"', '""',
                            '"x\\r"', '"[TOOL_CALLS]"'])
sse_reads = st.one_of(
    st.lists(contents, min_size=1, max_size=4).map(lambda cs: frame([b"".join(event(c) for c in cs)])),
    st.lists(contents, min_size=1, max_size=4).map(lambda cs: frame([event(c) for c in cs])),
    st.tuples(st.lists(contents, min_size=1, max_size=3), st.integers(1, 30)).map(
        lambda t: frame([b"".join(event(c) for c in t[0])[: -t[1]]])),
    st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=3).map(frame),
    reads,
)


@settings(max_examples=500, deadline=None)
@given(sse_reads)
def test_sse_passes_what_the_rewriter_passes_unchanged(read: bytes) -> None:
    got = _relay.check(read, _relay.SSE, TRIGGERS)
    body = chunk_data(read)
    first, escaped = TRIGGERS
    plain = (body is not None and first not in body and escaped not in body
             and SSEDecoder().whole(body))
    if plain:  # the rewriter's own fast path: C takes it too
        assert got is not None
    if got is not None:
        assert body is not None
        rewriter = StreamRewriter(get_format("nemotron"), "r")  # type: ignore[arg-type]
        assert rewriter.feed(body) == body  # unchanged...
        assert rewriter.plain_triggers() == TRIGGERS  # ...and nothing held
        assert got == b"%x\r\n%s\r\n" % (len(body), body)  # framed as the gateway frames a chunk


def test_sse_gives_back_an_event_that_may_open_a_tool_call() -> None:
    assert _relay.check(frame([event('" word"')]), _relay.SSE, TRIGGERS) is not None
    for content in ['"<TOOLCALL>"', '"\\u003cTOOLCALL>"', '"\\u003CTOOLCALL>"']:
        assert _relay.check(frame([event(content)]), _relay.SSE, TRIGGERS) is None


def test_a_busy_rewriter_has_no_plain_triggers() -> None:
    rewriter = StreamRewriter(get_format("nemotron"), "r")  # type: ignore[arg-type]
    assert rewriter.plain_triggers() == TRIGGERS
    rewriter.feed(event('"<TOOLCALL>[{\\"name\\""'))
    assert rewriter.plain_triggers() is None  # in a tool call: the Python step's
    rewriter = StreamRewriter(get_format("nemotron"), "r")  # type: ignore[arg-type]
    rewriter.feed(event('" word"')[:20])
    assert rewriter.plain_triggers() is None  # half an event held


# -- the thread ----------------------------------------------------------------


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    yield from socket_pairs()



async def handed_back(relay: NativeRelay) -> None:
    with trio.fail_after(STEP_S):
        await relay.wait()
    relay.finish()


async def test_whole_chunks_pass_and_the_last_comes_back(pairs: tuple[socket.socket, ...]) -> None:
    engine, src, dst, client = pairs
    relay = NativeRelay(src.fileno(), dst.fileno(), relaying.RAW)
    relay.hand_over()
    for chunks in ([b"hello"], [b"a", b"bc"]):
        engine.sendall(frame(chunks))
        assert await trio.to_thread.run_sync(read_exactly, client, len(frame(chunks))) == frame(chunks)
    engine.sendall(b"0\r\n\r\n")
    await handed_back(relay)
    assert relay.data == b"0\r\n\r\n" and relay.bytes_out == len(frame([b"hello"]) + frame([b"a", b"bc"]))
    assert not (relay.pending or relay.eof or relay.error or relay.taken)
    assert relay.take_back() is False  # already back


async def test_rewritten_streams_pass_plain_events_framed_as_one_chunk(
    pairs: tuple[socket.socket, ...]
) -> None:
    engine, src, dst, client = pairs
    relay = NativeRelay(src.fileno(), dst.fileno(), relaying.SSE, TRIGGERS)
    relay.hand_over()
    two = [event('" a"'), event('" b"')]
    engine.sendall(frame(two))  # two chunks in one read: one chunk out
    want = frame([b"".join(two)])
    assert await trio.to_thread.run_sync(read_exactly, client, len(want)) == want
    engine.sendall(frame([event('"<TOOLCALL>"')]))
    await handed_back(relay)
    assert relay.data == frame([event('"<TOOLCALL>"')])  # for the rewriter, unprocessed
    assert relay.bytes_out == len(b"".join(two))


async def test_the_engine_closing_comes_back_as_eof(pairs: tuple[socket.socket, ...]) -> None:
    engine, src, dst, _client = pairs
    relay = NativeRelay(src.fileno(), dst.fileno(), relaying.RAW)
    relay.hand_over()
    engine.shutdown(socket.SHUT_WR)
    await handed_back(relay)
    assert relay.eof and relay.data == b"" and relay.error is None


async def test_a_client_that_does_not_keep_up_comes_back_with_what_is_unwritten(
    pairs: tuple[socket.socket, ...]
) -> None:
    engine, src, dst, _client = pairs
    try:
        while True:  # the client's socket full: it reads nothing
            dst.send(b"x" * 65536)
    except BlockingIOError:
        pass
    relay = NativeRelay(src.fileno(), dst.fileno(), relaying.RAW)
    relay.hand_over()
    engine.sendall(frame([b"token"]))
    await handed_back(relay)
    assert relay.pending == frame([b"token"]) and relay.reads == 1 and not relay.data


async def test_taken_back_the_thread_lets_go_and_the_waiter_wakes(pairs: tuple[socket.socket, ...]) -> None:
    engine, src, dst, client = pairs
    relay = NativeRelay(src.fileno(), dst.fileno(), relaying.RAW)
    relay.hand_over()
    engine.sendall(frame([b"first"]))
    assert await trio.to_thread.run_sync(read_exactly, client, len(frame([b"first"]))) == frame([b"first"])
    assert relay.reads == 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handed_back, relay)
        await trio.testing.wait_all_tasks_blocked()
        assert relay.take_back() is True
    assert relay.taken and relay.efd == -1
    await assert_left_alone(engine, src)


async def test_a_socket_cannot_be_handed_over_twice(pairs: tuple[socket.socket, ...]) -> None:
    _engine, src, dst, _client = pairs
    first = NativeRelay(src.fileno(), dst.fileno(), relaying.RAW)
    first.hand_over()
    second = NativeRelay(src.fileno(), dst.fileno(), relaying.RAW)
    with pytest.raises(FileExistsError):
        second.hand_over()
    with pytest.raises(RuntimeError, match="set up again"):
        first._c.__init__(src.fileno(), dst.fileno(), first.efd)  # type: ignore[misc]
    first.finish()
    second.hand_over()  # once the first let go
    second.finish()
    assert first.taken and second.taken


async def test_take_backs_racing_the_thread_lose_no_byte(pairs: tuple[socket.socket, ...]) -> None:
    """The task takes the body back again and again while the engine streams
    and the thread relays: every byte the engine sent reaches the client
    once, in order, whether the thread wrote it or handed it back (read and
    not passed, or passed and not yet written)."""
    engine, src, dst, client = pairs
    sent = b"".join(frame([b"%06d" % i]) for i in range(20_000))

    def engine_side() -> None:
        engine.sendall(sent)
        engine.shutdown(socket.SHUT_WR)

    def client_side() -> bytes:
        client.settimeout(STEP_S * 6)
        got = bytearray()
        while data := client.recv(65536):
            got += data
        return bytes(got)

    def to_client(data: bytes) -> None:
        dst.setblocking(True)
        dst.sendall(data)
        dst.setblocking(False)

    async with trio.open_nursery() as nursery:
        received: list[bytes] = []

        async def collect() -> None:
            received.append(await trio.to_thread.run_sync(client_side))

        nursery.start_soon(trio.to_thread.run_sync, engine_side)
        nursery.start_soon(collect)
        eof = False
        taken = 0
        with trio.fail_after(STEP_S * 6):
            while not eof:
                relay = NativeRelay(src.fileno(), dst.fileno(), relaying.RAW)
                relay.hand_over()
                await trio.lowlevel.checkpoint()
                taken += relay.take_back()
                relay.finish()
                for left in (relay.pending, relay.data):  # the thread's order: pending, then what it read
                    if left:
                        to_client(left)
                eof = relay.eof
        dst.shutdown(socket.SHUT_WR)
    assert received == [sent]
    assert taken  # some were taken back from the thread, not all handed back


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="three open file descriptors"):
        _relay.Relay(-1, 1, 2)
    with pytest.raises(ValueError, match="mode"):
        _relay.Relay(0, 1, 2, 7)
    with pytest.raises(ValueError, match="1 to 16 bytes"):
        _relay.Relay(0, 1, 2, _relay.SSE, (b"x" * 17,))
