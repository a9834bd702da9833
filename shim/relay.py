"""The common case of a streamed body, relayed off trio's loop.

An engine writes each token as its own chunk, tens of milliseconds apart
on every stream. Relayed by a trio task, each of them costs a trip through
trio's scheduler: the task's wait armed again in epoll, a turn of the run
loop, a task switch. That was most of the gateway's CPU per event, twice a
plain relay's (socket-proxyd's), although the work itself is a read, a
check of the chunk and a write.

One thread with its own epoll does that work instead, for the reads that
the body's `step` takes whole: it reads, lets `step` check (and rewrite)
the bytes, and writes them to the client. Anything else goes back to the
task, unprocessed: the body's end, a read `step` does not take (bad
framing, a chunk split across reads), a client that does not keep up, the
engine's close or an error. The task then goes on with its own loop, which
handles all of that as before.

A relay belongs to the thread from `hand_over` until it is handed back
(the task's `done` event) or taken back (`take_back`, under the lock);
only then may the task touch its sockets, or anyone close them.

Where the C part (shim/_relay.c) was built, the common cases go to its
thread instead (`NativeRelay`): a whole-chunk pass-through, and a rewritten
stream whose rewriter would pass the events unchanged. That thread never
takes the GIL, so a relayed event no longer waits for the trio thread's
work on other requests (up to the interpreter's 5 ms switch interval at
each system call of the Python thread). Both threads keep the same
contract; the Python one takes what the C one cannot (a rewriter in the
middle of a tool call), and everything where the C part is missing.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
import types
from collections.abc import Callable

import trio

_relay: types.ModuleType | None
try:
    from . import _relay
except ImportError:  # not built (no C compiler at install): the Python thread relays everything
    _relay = None

log = logging.getLogger("vllm_gateway.relay")

# Whether the C thread takes the bodies it can. VLLM_GATEWAY_RELAY=python
# turns it off (for comparisons, and for the tests of the Python thread).
NATIVE = _relay is not None and os.environ.get("VLLM_GATEWAY_RELAY", "") != "python"
RAW = 0  # whole chunks passed byte for byte (_relay.RAW)
SSE = 1  # whole chunks of plain SSE events, framed again as one chunk (_relay.SSE)

# As much as the trio side reads at once (shim/httpio.py READ_BYTES).
READ_BYTES = 65536
# The events one epoll call returns at most; more wait for the next call.
MAX_EVENTS = 256


class Relay:
    """One body handed to the relay thread: its engine and client sockets,
    its step, and what the task finds when it gets it back."""

    __slots__ = ("data", "done", "dst", "eof", "error", "last_read", "pending", "reads", "src", "step",
                 "taken", "token")

    def __init__(self, src: int, dst: int, step: Callable[[bytes], bytes | None]) -> None:
        self.src = src  # the engine's socket
        self.dst = dst  # the client's socket
        # bytes read -> the bytes to write to the client, or None: the task's to handle
        self.step = step
        self.token = trio.lowlevel.current_trio_token()
        self.done = trio.Event()  # handed back
        self.reads = 0  # reads taken
        self.last_read = 0  # time.monotonic_ns() of the last one: the task's read timer watches it
        self.data = b""  # read, not taken by step: the task's to handle
        self.pending = b""  # taken by step, not yet written: the task writes it
        self.eof = False  # the engine closed its end
        self.error: OSError | None = None  # reading the engine failed
        self.taken = False  # taken back, before the thread handed it back

    # The same interface as NativeRelay's, for the task.
    bytes_out = 0  # the step counts the bytes it passes itself

    def hand_over(self) -> None:
        RELAYS.hand_over(self)

    def take_back(self) -> bool:
        return RELAYS.take_back(self)

    async def wait(self) -> None:
        """Until the thread hands the body back (or it is taken back)."""
        await self.done.wait()

    def finish(self) -> None:
        """The task is done with it: the thread lets go, if it had not."""
        RELAYS.take_back(self)


class NativeRelay:
    """One body handed to the C thread, with a check instead of a step:
    RAW or SSE (the rewriter's triggers, which no passed event may hold).
    What the thread leaves is read into these fields by `finish`."""

    __slots__ = ("_c", "bytes_out", "data", "efd", "eof", "error", "pending", "taken")

    def __init__(self, src: int, dst: int, mode: int, triggers: tuple[bytes, ...] = ()) -> None:
        assert _relay is not None
        # The thread writes it when it hands the body back; the task waits on it through trio.
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._c = _relay.Relay(src, dst, self.efd, mode, triggers)
        except BaseException:
            os.close(self.efd)
            raise
        self.bytes_out = 0  # data bytes the thread passed (the client's body)
        self.data = b""
        self.pending = b""
        self.eof = False
        self.error: OSError | None = None
        self.taken = False

    @property
    def reads(self) -> int:
        return int(self._c.reads)

    @property
    def last_read(self) -> int:
        return int(self._c.last_read)

    def hand_over(self) -> None:
        self._c.hand_over()

    def take_back(self) -> bool:
        """As `Relays.take_back`; the task waiting in `wait` wakes."""
        if not self._c.take_back():
            return False
        os.eventfd_write(self.efd, 1)
        return True

    async def wait(self) -> None:
        await trio.lowlevel.wait_readable(self.efd)

    def finish(self) -> None:
        """The thread lets go (if it had not), its results are read, the eventfd closed."""
        if self.efd < 0:
            return
        self._c.take_back()
        _reads, self.bytes_out, self.data, self.pending, eof, errno, taken = self._c.result()
        self.eof, self.taken = bool(eof), bool(taken)
        self.error = OSError(errno, os.strerror(errno)) if errno else None
        os.close(self.efd)
        self.efd = -1


AnyRelay = Relay | NativeRelay


class Relays:
    """The relay thread (started with the first relay) and its relays."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_fd: dict[int, Relay] = {}
        self._epoll: select.epoll | None = None
        self._buffer = bytearray(READ_BYTES)

    def hand_over(self, relay: Relay) -> None:
        """From the task: the thread relays until it hands the body back."""
        with self._lock:
            if self._epoll is None:
                self._epoll = select.epoll()
                threading.Thread(target=self._run, args=(self._epoll,), name="vllm-gateway-relay",
                                 daemon=True).start()
            self._by_fd[relay.src] = relay
            self._epoll.register(relay.src, select.EPOLLIN)

    def take_back(self, relay: Relay) -> bool:
        """From the task (or whoever closes its sockets): the thread no longer
        touches this relay once this returns. False if it had handed it back."""
        with self._lock:
            if self._by_fd.get(relay.src) is not relay:
                return False
            del self._by_fd[relay.src]
            assert self._epoll is not None
            self._epoll.unregister(relay.src)
            relay.taken = True
        relay.done.set()
        return True

    def _run(self, epoll: select.epoll) -> None:
        view = memoryview(self._buffer)
        while True:
            try:
                events = epoll.poll(-1, MAX_EVENTS)
            except InterruptedError:  # pragma: no cover - a signal; Python retries
                continue
            # The lock is taken for one relay at a time, not for the whole batch:
            # the task that hands a body over or takes one back (at every
            # stream's start and end) waits for one read and write, not for up
            # to MAX_EVENTS of them.
            for fd, _mask in events:
                with self._lock:
                    relay = self._by_fd.get(fd)
                    if relay is None:  # taken back meanwhile
                        continue
                    try:
                        keep = self._relay_one(relay, view)
                    except BaseException:  # never the thread: the task handles what went wrong
                        log.exception("relay thread: handing a body back")
                        keep = False
                    if not keep:
                        del self._by_fd[fd]
                        epoll.unregister(fd)
                        try:
                            relay.token.run_sync_soon(relay.done.set)
                        except trio.RunFinishedError:  # pragma: no cover - its trio run is over
                            pass

    def _relay_one(self, relay: Relay, view: memoryview) -> bool:
        """One read of the relay's engine socket; whether the thread keeps it."""
        try:
            n = os.readv(relay.src, (self._buffer,))
        except BlockingIOError:
            return True
        except OSError as e:
            relay.error = e
            return False
        if not n:
            relay.eof = True
            return False
        data = view[:n].tobytes()
        relay.last_read = time.monotonic_ns()
        relay.reads += 1
        try:
            out = relay.step(data)
        except Exception:  # a bug in a step: the read goes back to the task, whose own code meets it
            log.exception("relay thread: a step failed; the read goes back to the task")
            out = None
        if out is None:
            relay.data = data
            return False
        if not out:
            return True
        try:
            sent = os.write(relay.dst, out)
        except OSError:  # full (BlockingIOError) or gone: the task writes, and finds out which
            sent = 0
        if sent < len(out):
            relay.pending = out[sent:]
            return False
        return True


RELAYS = Relays()
