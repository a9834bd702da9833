"""The relay thread on socket pairs: what `step` takes is written to the
client by the thread; everything else comes back to the task as it was."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import trio

from shim import relay as relaying
from shim.relay import RELAYS, Relay
from tests.relay_util import STEP_S, Pairs, assert_left_alone, read_exactly, socket_pairs


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    yield from socket_pairs()


def upper(data: bytes) -> bytes | None:
    """A step: takes lower-case reads (upper-cased), leaves anything else."""
    return data.upper() if data.islower() else None


async def handed_back(relay: Relay) -> None:
    with trio.fail_after(STEP_S):
        await relay.done.wait()



async def test_what_step_takes_is_written_and_the_rest_comes_back(pairs: tuple[socket.socket, ...]) -> None:
    engine, src, dst, client = pairs
    relay = Relay(src.fileno(), dst.fileno(), upper)
    RELAYS.hand_over(relay)
    for word in (b"hello", b"world"):
        engine.sendall(word)
        assert await trio.to_thread.run_sync(read_exactly, client, len(word)) == word.upper()
    engine.sendall(b"THE END")
    await handed_back(relay)
    assert relay.data == b"THE END" and relay.reads == 3
    assert not (relay.pending or relay.eof or relay.error or relay.taken)
    assert RELAYS.take_back(relay) is False  # already back


async def test_the_engine_closing_comes_back_as_eof(pairs: tuple[socket.socket, ...]) -> None:
    engine, src, dst, _client = pairs
    relay = Relay(src.fileno(), dst.fileno(), upper)
    RELAYS.hand_over(relay)
    engine.shutdown(socket.SHUT_WR)
    await handed_back(relay)
    assert relay.eof and relay.data == b""


async def test_a_client_that_does_not_keep_up_comes_back_with_what_is_unwritten(
    pairs: tuple[socket.socket, ...]
) -> None:
    engine, src, dst, _client = pairs
    big = 8 * 2**20  # more than a socket buffer takes
    relay = Relay(src.fileno(), dst.fileno(), lambda data: b"y" * big)
    RELAYS.hand_over(relay)
    engine.sendall(b"x")
    await handed_back(relay)
    assert 0 < len(relay.pending) < big and relay.pending == b"y" * len(relay.pending)
    assert not relay.data and relay.reads == 1


async def test_taken_back_the_thread_lets_go(pairs: tuple[socket.socket, ...]) -> None:
    engine, src, dst, client = pairs
    relay = Relay(src.fileno(), dst.fileno(), upper)
    RELAYS.hand_over(relay)
    engine.sendall(b"first")
    assert await trio.to_thread.run_sync(read_exactly, client, 5) == b"FIRST"
    assert RELAYS.take_back(relay) is True
    assert relay.taken and relay.done.is_set()
    await assert_left_alone(engine, src)


async def test_a_failing_step_hands_the_body_back(pairs: tuple[socket.socket, ...]) -> None:
    engine, src, dst, _client = pairs

    def broken(data: bytes) -> bytes | None:
        raise RuntimeError("a bug")

    relay = Relay(src.fileno(), dst.fileno(), broken)
    RELAYS.hand_over(relay)
    engine.sendall(b"anything")
    await handed_back(relay)
    assert relay.reads == 1 and not relay.pending


async def test_a_step_that_fails_gives_its_read_back(pairs: tuple[socket.socket, ...]) -> None:
    # The bytes were read from the engine: dropped, the client's stream would
    # silently lose them; the task gets them and handles them as any read.
    engine, src, dst, _client = pairs

    def broken(data: bytes) -> bytes | None:
        raise ValueError("a bug")

    relay = Relay(src.fileno(), dst.fileno(), broken)
    RELAYS.hand_over(relay)
    engine.sendall(b"token")
    await handed_back(relay)
    assert relay.data == b"token" and relay.reads == 1
    assert not (relay.pending or relay.eof or relay.error)


def test_the_c_part_is_built_where_the_tests_run_in_ci() -> None:
    # Without it the gateway relays with its Python thread and the tests of
    # tests/test_relay_native.py skip: CI must not pass that off as tested.
    if relaying._relay is None and not os.environ.get("CI"):
        pytest.skip("shim/_relay.c is not built here (no C compiler or Python headers at install)")
    assert relaying._relay is not None, "shim/_relay.c was not built: install gcc and Python's headers"
    assert relaying.NATIVE or os.environ.get("VLLM_GATEWAY_RELAY") == "python"
