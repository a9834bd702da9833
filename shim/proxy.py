"""Forwarding one request to the engine and its response back, with h11's
API on both sides (shim/http1.py: a strict fast path for plain messages,
h11 itself for the rest). Bodies of requests are buffered (bounded) so that
a request can wait through a cold start and be retried once; responses
stream through as they arrive, with backpressure both ways."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio

from . import relay as relaying
from . import toolcalls
from .chunked import ChunkedDecoder, ChunkedError, ChunkedPassthrough, chunk_data, whole_chunks_only
from .engine import Engine
from .errors import (
    BadRequest,
    EngineStopped,
    GatewayError,
    StreamBroken,
    UpstreamError,
    UpstreamTimeout,
    engine_error_body,
    error_body,
)
from .http1 import ServerConnection
from .httpio import READ_BYTES, end_to_end_headers, header, next_event, receive, send, send_all
from .lifecycle import State
from .relay import AnyRelay, NativeRelay, Relay
from .routes import CHAT, Route
from .upstream import UpstreamConn

log = logging.getLogger("vllm_gateway.proxy")

# When the engine connection fails before any response byte, wait this long
# for systemd to report what happened before retrying.
RETRY_SETTLE_S = 2.0
# Whole chat completions are buffered to rewrite tool calls; bound it.
MAX_REWRITE_BODY_BYTES = 64 * 1024 * 1024
# A streamed request that waits longer than this for the engine gets its
# 200 head and keep-alive comments; quicker waits (most wakes) look normal.
KEEPALIVE_GRACE_S = 2.0


@dataclass
class Exchange:
    """What the request log needs to know about one forwarded request."""

    status: int = 0
    bytes_out: int = 0
    waited_s: float = 0.0
    tool_calls: int = 0
    model: str | None = None
    head_sent: bool = False  # a 200 event-stream head went out while waiting
    # the engine's read_timeout: silence past it means it hangs
    read_timeout_s: float = 600.0
    event_stream: bool = False  # the response is SSE: errors can go in-band
    # how it ended: complete (an answer, errors included), client_gone, engine_gone,
    # stopped (cut by a stop), timeout (the engine went silent), error, cancelled
    outcome: str = "complete"


class ClientSide:
    def __init__(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn
        self.method = b""  # of the request being served
        self.control = False  # on the local control socket
        self.linger = False  # drain the client's input before closing
        self.answered = False  # a request was answered on this connection

    async def send(self, event: h11.Event) -> None:
        if type(event) is h11.Response and not event.reason:  # the gateway's own answers
            event = h11.Response(status_code=event.status_code, headers=event.headers.raw_items(),
                                 reason=reason_phrase(event.status_code))
        await send(self.conn, self.stream, event)

    # The bytes of a response head, body data and end: built directly where
    # the connection is on the fast path, through h11 events otherwise.

    def head_bytes(self, head: Head) -> bytes:
        status, headers, reason = head
        reason = reason or reason_phrase(status)
        if type(self.conn) is ServerConnection:
            return self.conn.send_head(status, headers, reason)
        return self.conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""

    def data_bytes(self, data: bytes) -> bytes:
        if type(self.conn) is ServerConnection:
            return self.conn.send_data(data)
        return self.conn.send(h11.Data(data=data)) or b""

    @property
    def chunked_out(self) -> bool:
        """Whether `data_bytes` frames as a chunk ("%x\\r\\n" data "\\r\\n")."""
        return type(self.conn) is ServerConnection and self.conn.chunked_out

    def end_bytes(self) -> bytes:
        if type(self.conn) is ServerConnection:
            return self.conn.send_end()
        return self.conn.send(h11.EndOfMessage()) or b""


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of a status ("OK" for 200); b"" for unknown ones."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


# A response head to send: status, headers, reason.
Head = tuple[int, list[tuple[bytes, bytes]], bytes]


async def forward(
    engine: Engine,
    client: ClientSide,
    req: h11.Request,
    route: Route,
    body: bytes,
    request_id: str,
    max_waiting: int,
    parsed: dict[str, object] | None = None,
    keepalive_s: float | None = None,
    ex: Exchange | None = None,
) -> Exchange:
    """Forward one request; `ex`, where given, is filled in as it goes (so
    that it tells how far a request got that ends in an exception)."""
    ex = ex or Exchange()
    ex.read_timeout_s = engine.cfg.read_timeout_s
    fmt = toolcalls.get_format(engine.cfg.tool_call_format) if route.path == CHAT else None
    if fmt is not None:
        try:
            body = toolcalls.adapt_request(body, fmt, parsed)
        except toolcalls.ToolChoiceError as e:
            raise BadRequest(f"vllm-gateway: {e}") from None
        if not _client_allows_tool_calls(parsed):
            fmt = None  # as OpenAI and vLLM do: no tools, or "none", means text only
    headers = [(b"host", b"127.0.0.1:%d" % engine.cfg.port)]  # first, as h11 would write it
    headers += [(n, v) for n, v in end_to_end_headers(req.headers) if n not in (b"host", b"content-length")]
    headers.append((b"content-length", b"%d" % len(body)))
    if header(req.headers, b"x-request-id") is None:
        headers.append((b"x-request-id", request_id.encode()))
    up_req = (req.method, route.target.encode(), headers)

    if keepalive_s and parsed is not None and parsed.get("stream") is True and not engine.ready:
        try:
            ex.waited_s += await _wait_with_keepalive(engine, client, max_waiting, keepalive_s, ex)
        except GatewayError as e:
            if not ex.head_sent:
                raise
            ex.bytes_out += await send_stream_error(client, e.body())
            ex.status = e.status
            return ex

    retried = False
    while True:
        # the lease keeps the engine awake (no sleep) until the response is relayed
        async with engine.lease(max_waiting) as lease:
            ex.waited_s += lease.waited_s
            try:
                up, resp = await _send_request(engine, up_req, body, ex.read_timeout_s)
            except UpstreamTimeout:
                _restart_hung(engine, ex)
                raise
            except _BeforeResponse as e:
                if retried:
                    raise UpstreamError(f"vllm-gateway: cannot reach the engine: {e}") from None
                log.info("engine connection failed before a response (%s); retrying once", e)
            else:
                try:
                    await _relay(engine, client, up, resp, fmt, request_id, ex)
                except BaseException as e:
                    up.close()
                    if isinstance(e, StreamBroken) and e.hung:
                        _restart_hung(engine, ex)
                    raise
                engine.upstream.release(up)
                return ex
        retried = True
        await engine.wait_changed(RETRY_SETTLE_S)


def _restart_hung(engine: Engine, ex: Exchange) -> None:
    """A silent engine is stopped; the next request starts a fresh one."""
    log.error("the engine sent nothing for %g s: stopping it as hung", ex.read_timeout_s)
    engine.request_stop("hung")


def _client_allows_tool_calls(parsed: dict[str, object] | None) -> bool:
    """Rewrite only when the client offered tools and did not forbid calls."""
    return parsed is not None and bool(parsed.get("tools")) and parsed.get("tool_choice") != "none"


async def _wait_with_keepalive(
    engine: Engine, client: ClientSide, max_waiting: int, every_s: float, ex: Exchange
) -> float:
    """Wait for the engine; past the grace period, answer 200 with an event
    stream and send an SSE comment every `every_s` until it is ready."""
    t0 = trio.current_time()
    failed: list[GatewayError] = []
    async with trio.open_nursery() as nursery:

        async def wait() -> None:
            try:
                await engine.acquire(max_waiting)
            except GatewayError as e:
                failed.append(e)
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait)
        await trio.sleep(min(KEEPALIVE_GRACE_S, every_s))
        await client.send(h11.Response(status_code=200, headers=[
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
        ]))
        ex.head_sent = True
        ex.event_stream = True
        ex.status = 200
        while True:
            verb = "starting" if engine.in_state(State.STOPPED, State.STARTING, State.FAILED) else "waking"
            elapsed = trio.current_time() - t0
            comment = f": vllm-gateway: {verb} engine, {elapsed:.0f} s\n\n".encode()
            ex.bytes_out += len(comment)
            await client.send(h11.Data(data=comment))
            await trio.sleep(every_s)
    if failed:
        raise failed[0]
    return trio.current_time() - t0


async def send_stream_error(client: ClientSide, error_json: bytes) -> int:
    """End an event stream whose head went out with an error event (OpenAI's
    clients raise it as an APIError); the bytes of the event."""
    event = b"data: " + error_json + b"\n\n"
    await client.send(h11.Data(data=event))
    await client.send(h11.EndOfMessage())
    return len(event)


def outcome_of(e: GatewayError) -> str:
    """The outcome a request that ended with this error is logged with."""
    if isinstance(e, EngineStopped):
        return "stopped"
    if isinstance(e, UpstreamTimeout):
        return "timeout"
    if isinstance(e, UpstreamError):
        return "engine_gone"
    return "complete"


class _BeforeResponse(Exception):
    """The engine connection failed before any response byte: safe to retry."""


async def _send_request(
    engine: Engine, up_req: tuple[bytes, bytes, list[tuple[bytes, bytes]]], body: bytes,
    read_timeout_s: float,
) -> tuple[UpstreamConn, h11.Response]:
    """Send the request and read the response head. A reused keep-alive
    connection that the engine had closed is replaced at once."""
    method, target, headers = up_req
    while True:
        up: UpstreamConn | None = None
        try:
            up = await engine.upstream.connect()
            # one write for head and body: the engine wakes once per request
            await send_all(up.stream, up.conn.send_request(method, target, headers, body))
            # the engine cannot have answered yet: wait before reading
            event = await next_event(up.conn, up.stream, trio.current_time() + read_timeout_s,
                                     wait_first=True)
            if not isinstance(event, h11.Response):
                raise UpstreamError(f"vllm-gateway: the engine answered with {type(event).__name__}")
            up.conn_response_headers = list(event.headers)
            return up, event
        except trio.TooSlowError:
            assert up is not None
            up.close()
            raise UpstreamTimeout(
                f"vllm-gateway: the engine sent nothing for {read_timeout_s:g} s; it is restarted"
            ) from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as e:
            if up is not None and up.cut_reason is not None:
                if not up.cut_retry:
                    raise EngineStopped(up.cut_reason) from None
                raise _BeforeResponse(up.cut_reason) from None
            if up is not None:
                up.close()
                if up.conn.answered:  # a broken answer, not a lost one: never sent twice
                    raise UpstreamError(f"vllm-gateway: the engine's answer is not valid HTTP: {e}") from None
                if up.reused:
                    continue
            raise _BeforeResponse(str(e) or type(e).__name__) from None


async def _relay(
    engine: Engine,
    client: ClientSide,
    up: UpstreamConn,
    resp: h11.Response,
    fmt: toolcalls.ToolCallFormat | None,
    request_id: str,
    ex: Exchange,
) -> None:
    if ex.head_sent:
        await _relay_after_keepalive(client, up, resp, fmt, request_id, ex)
        return
    ex.status = resp.status_code
    headers = end_to_end_headers(resp.headers)
    if ex.waited_s > 0:
        headers.append((b"x-vllm-gateway-cold-start-ms", str(round(ex.waited_s * 1000)).encode()))
    ctype = header(resp.headers, b"content-type") or b""
    ex.event_stream = ctype.startswith(b"text/event-stream")
    if fmt is not None and resp.status_code == 200 and ex.event_stream:
        await _relay_stream_rewritten(client, up, resp, headers, fmt, request_id, ex)
    elif resp.status_code == 200 and ex.event_stream and ex.waited_s > 0:
        await _pump(client, up, ex, None, (resp.status_code, headers, resp.reason), _waited_comment(ex))
    elif fmt is not None and resp.status_code == 200 and ctype.startswith(b"application/json"):
        await _relay_whole_rewritten(client, up, resp, headers, fmt, request_id, ex)
    elif resp.status_code >= 400 and client.method != b"HEAD":
        await _relay_error(client, up, resp, headers, ex)
    else:
        await _pump(client, up, ex, None, (resp.status_code, headers, resp.reason))


async def _pump(
    client: ClientSide,
    up: UpstreamConn,
    ex: Exchange,
    rewriter: toolcalls.StreamRewriter | None,
    head: Head | None = None,
    preface: bytes = b"",
) -> None:
    """Move the response (its head, if given, then `preface`, then the body)
    from the engine to the client until the end.

    Everything the engine sent in one read goes out in one write, however
    many events or chunks it holds: a stream of small SSE events costs one
    system call per burst, not one per event.
    """
    if rewriter is None and head is not None and _both_chunked(client, up, head):
        await _pump_raw(client, up, ex, head, preface)
        return
    if rewriter is not None and header(up.conn_response_headers, b"transfer-encoding") == b"chunked":
        await _pump_rewritten(client, up, ex, rewriter, head, preface)
        return
    conn = up.conn
    out: list[bytes] = [] if head is None else [client.head_bytes(head)]
    if preface:
        ex.bytes_out += len(preface)
        out.append(client.data_bytes(preface))
    first = out[0] if out else None  # the head, until it is written
    pending: list[bytes] = []  # body bytes read but not yet framed for the client
    timer = _ReadTimer(ex.read_timeout_s)
    wait_first = False
    with timer.scope:
        while True:
            try:
                event = conn.next_event()
            except h11.ProtocolError as e:
                if first is not None and out and out[0] is first:
                    await _bad_gateway(client, ex, e)
                else:
                    await _abort_stream(client, ex, e)
                raise StreamBroken(str(e)) from None
            if type(event) is h11.Data:
                pending.append(event.data)
                continue
            if pending:
                raw = pending[0] if len(pending) == 1 else b"".join(pending)
                pending.clear()
                data = rewriter.feed(bytes(raw)) if rewriter else raw
                if data:
                    ex.bytes_out += len(data)
                    out.append(client.data_bytes(data))
            if type(event) is h11.EndOfMessage:
                if rewriter:
                    tail = rewriter.end()
                    if tail:
                        ex.bytes_out += len(tail)
                        out.append(client.data_bytes(tail))
                    ex.tool_calls = rewriter.tool_calls
                out.append(client.end_bytes())
                await _send_last(client, ex, out)
                return
            if event is not h11.NEED_DATA:
                continue  # trailers' end (EndOfMessage covers them) or nothing
            data = await _flush_and_read(client, up, ex, out, timer, wait_first=wait_first)
            wait_first = 0 < len(data) < READ_BYTES
            conn.receive_data(data)  # b"": the end
    await _timed_out(client, ex, timer, True)


class _ReadTimer:
    """The engine's read timeout over a whole relayed body: one cancel
    scope, whose deadline moves with the reads. A scope per read cost about
    a fifth of the CPU of relaying an event (an engine writes each token on
    its own, so nearly every read waits), and so does moving a deadline at
    every read (trio re-files it each time): the deadline moves at most
    once per `slack_s`, so the scope fires between `timeout_s` and
    `timeout_s + slack_s` after the engine's last bytes, never sooner.
    `reading` tells whether it fired while the gateway waited for the
    engine (a hung engine) or for the client to take what it was sent."""

    __slots__ = ("armed_at", "reading", "scope", "slack_s", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        # late by at most 1 s at the default 600 s, a sixteenth for short ones
        self.slack_s = min(1.0, timeout_s / 16)
        self.armed_at = trio.current_time()
        self.scope = trio.CancelScope(deadline=self.armed_at + timeout_s + self.slack_s)
        self.reading = False

    def read(self) -> None:
        """The engine sent bytes: the timeout counts from now."""
        now = trio.current_time()
        if now - self.armed_at > self.slack_s:
            self.armed_at = now
            self.scope.deadline = now + self.timeout_s + self.slack_s


async def _timed_out(client: ClientSide, ex: Exchange, timer: _ReadTimer, at_boundary: bool) -> None:
    """A body's read timer fired: the engine went silent (the stream ends
    with an error, the engine is restarted), or the client did not take
    its bytes in that time (trio.TooSlowError, as for any slow write)."""
    if not timer.reading:
        raise trio.TooSlowError
    await _abort_stream(client, ex, trio.TooSlowError(), at_boundary)
    raise StreamBroken("timeout", hung=True)


async def _flush_and_read(
    client: ClientSide, up: UpstreamConn, ex: Exchange, out: list[bytes], timer: _ReadTimer,
    at_boundary: bool = True, wait_first: bool = False,
) -> bytes:
    """Write what is pending to the client in one go, then read the engine's
    next bytes, under the body's read timer. `wait_first` after a read that
    emptied the socket: an engine writes each event on its own, so a read
    right after the write to the client would only find nothing."""
    if out:
        try:
            await send_all(client.stream, out[0] if len(out) == 1 else b"".join(out))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            ex.outcome = "client_gone"
            raise StreamBroken(f"the client went away: {e}") from None
        out.clear()
    timer.reading = True
    try:
        data = await receive(up.stream, wait_first=wait_first)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
        timer.reading = False
        await _abort_stream(client, ex, e, at_boundary, up.cut_reason)
        raise StreamBroken(str(e)) from None
    timer.reading = False
    timer.read()
    return data


# Streamed bodies go through the relay thread (shim/relay.py). Tests on
# trio's MockClock turn it off: the thread's reads take no virtual time, so
# a clock that jumps while trio idles would see an engine that sends nothing.
RELAY_THREAD = True


def _relayable(client: ClientSide, up: UpstreamConn) -> bool:
    """Whether the relay thread can take this body: both ends are sockets."""
    return (RELAY_THREAD and isinstance(client.stream, trio.SocketStream)
            and isinstance(up.stream, trio.SocketStream))


async def _relayed(
    client: ClientSide, up: UpstreamConn, ex: Exchange, out: list[bytes], timer: _ReadTimer,
    step: Callable[[bytes], bytes | None], native: tuple[int, tuple[bytes, ...]] | None = None,
) -> bytes:
    """As `_flush_and_read`, but the relay thread does the reads that `step`
    takes whole, and their writes; the first read it does not take (b"" at
    the engine's end) comes back here, for the caller's loop. With `native`
    (a check that does what `step` does for the reads it takes), the C
    thread relays instead, where it was built."""
    while True:
        if out:
            try:
                await send_all(client.stream, out[0] if len(out) == 1 else b"".join(out))
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                ex.outcome = "client_gone"
                raise StreamBroken(f"the client went away: {e}") from None
            out.clear()
        src, dst = up.stream.socket.fileno(), client.stream.socket.fileno()
        relay: AnyRelay = (NativeRelay(src, dst, *native) if native is not None and relaying.NATIVE
                           else Relay(src, dst, step))
        up.relay = relay
        relay.hand_over()
        try:
            await _wait_relay(relay, timer)
        finally:
            relay.finish()  # the thread lets go, where it had not handed it back: cancelled
            up.relay = None
        ex.bytes_out += relay.bytes_out
        if relay.pending:  # the client did not take it all at once: written here, with waiting
            out.append(relay.pending)
            continue
        if relay.taken or relay.error:  # the socket was closed under it, or broke: as any read
            return await _flush_and_read(client, up, ex, out, timer)
        return relay.data


async def _wait_relay(relay: AnyRelay, timer: _ReadTimer) -> None:
    """Wait until the relay thread hands the body back, keeping the read
    timeout meanwhile. The thread stamps each read it takes (the monotonic
    clock, which trio's follows), so the task wakes only when the timeout
    would fire had nothing come since: it then waits again, until
    `timeout_s` after the last read, or takes the body back and ends it as
    a hung engine through the timer's scope (which waits meanwhile). A
    stream that keeps sending costs the task no wake-up until its end."""
    fire_at = timer.scope.deadline
    timer.scope.deadline = math.inf
    while True:
        with trio.move_on_at(fire_at):
            await relay.wait()
            break
        fire_at = max(fire_at, _last_read_at(relay) + timer.timeout_s)
        if trio.current_time() >= fire_at:
            if relay.take_back():
                timer.reading = True
                timer.scope.cancel()
                await trio.lowlevel.checkpoint()
            break  # handed back meanwhile: its eventfd need not be waited for
    timer.armed_at = max(timer.armed_at, _last_read_at(relay))
    timer.scope.deadline = timer.armed_at + timer.timeout_s + timer.slack_s


def _last_read_at(relay: AnyRelay) -> float:
    """When the relay thread last read, on trio's clock; -inf before its first read."""
    stamp = relay.last_read
    if not stamp:
        return -math.inf
    return trio.current_time() - (time.monotonic_ns() - stamp) / 1e9


async def _send_last(client: ClientSide, ex: Exchange, out: list[bytes]) -> None:
    """The body's last write, under its read timer."""
    await send_all(client.stream, out[0] if len(out) == 1 else b"".join(out))


def _both_chunked(client: ClientSide, up: UpstreamConn, head: Head) -> bool:
    """Whether the engine's body is chunked and our framing of it is chunked too."""
    return (
        header(up.conn_response_headers, b"transfer-encoding") == b"chunked"
        and client.conn.their_http_version == b"1.1"
        and client.method != b"HEAD"
        and header(head[1], b"content-length") is None
        and head[0] not in (204, 304)
    )


async def _pump_raw(client: ClientSide, up: UpstreamConn, ex: Exchange, head: Head,
                    preface: bytes = b"") -> None:
    """Relay a chunked body byte for byte: no decoding, no re-framing. Only
    the last chunk (and a preface's) is ours, so both connections stay reusable."""
    passthrough = ChunkedPassthrough()
    relayable = _relayable(client, up)

    def raw_step(data: bytes) -> bytes | None:
        """In the relay thread: whole chunks pass as they are."""
        if not whole_chunks_only(data):
            return None
        ex.bytes_out += len(data)
        return data

    out = [client.head_bytes(head)]
    if preface:
        ex.bytes_out += len(preface)
        out.append(client.data_bytes(preface))
    data, _closed = up.conn.trailing_data  # body bytes read with the head
    timer = _ReadTimer(ex.read_timeout_s)
    wait_first = False
    with timer.scope:
        while True:
            if data:
                try:
                    forward_now = passthrough.feed(bytes(data))
                except ChunkedError as e:
                    if len(out) == 1 and not ex.bytes_out:  # only our head so far, unsent
                        await _bad_gateway(client, ex, e)
                    else:
                        # what was checked goes out, then the stream ends as broken
                        await send_all(client.stream, b"".join(out))
                        await _abort_stream(client, ex, e, passthrough.at_boundary)
                    raise StreamBroken(str(e)) from None
                if forward_now:
                    ex.bytes_out += len(forward_now)
                    out.append(forward_now)
                if passthrough.done:
                    out.append(client.end_bytes())
                    await _send_last(client, ex, out)
                    up.raw_done = not passthrough.leftover
                    return
            if relayable and passthrough.idle:
                data = await _relayed(client, up, ex, out, timer, raw_step, (relaying.RAW, ()))
            else:
                data = await _flush_and_read(client, up, ex, out, timer, passthrough.at_boundary, wait_first)
            if not data:
                await _abort_stream(client, ex, ConnectionError("the engine closed mid-response"),
                                    passthrough.at_boundary)
                raise StreamBroken("the engine closed mid-response")
            wait_first = len(data) < READ_BYTES
    await _timed_out(client, ex, timer, passthrough.at_boundary)


async def _pump_rewritten(client: ClientSide, up: UpstreamConn, ex: Exchange,
                          rewriter: toolcalls.StreamRewriter, head: Head | None,
                          preface: bytes = b"") -> None:
    """Relay a chunked body through the tool-call rewriter: decoded here,
    as each read comes (not through h11's events, two calls a read), and
    framed anew for the client. The engine's connection stays reusable."""
    decoder = ChunkedDecoder()
    relayable = _relayable(client, up)

    def rewrite_step(data: bytes) -> bytes | None:
        """In the relay thread: a read of one whole chunk, rewritten and framed."""
        body = chunk_data(data)
        if body is None:
            return None
        body = rewriter.feed(body)
        if not body:
            return b""
        ex.bytes_out += len(body)
        return client.data_bytes(body)

    out: list[bytes] = [] if head is None else [client.head_bytes(head)]
    first = out[0] if out else None  # the head, until it is written
    if preface:
        ex.bytes_out += len(preface)
        out.append(client.data_bytes(preface))
    data, _closed = up.conn.trailing_data  # body bytes read with the head
    timer = _ReadTimer(ex.read_timeout_s)
    wait_first = False
    with timer.scope:
        while True:
            if data:
                try:
                    body = decoder.feed(bytes(data))
                    if decoder.error:  # bad framing after good data: the stream is broken
                        raise ChunkedError(decoder.error)
                except ChunkedError as e:
                    if first is not None and out and out[0] is first:  # nothing sent yet
                        await _bad_gateway(client, ex, e)
                    else:
                        await _abort_stream(client, ex, e)
                    raise StreamBroken(str(e)) from None
                if body:
                    body = rewriter.feed(body)
                    if body:
                        ex.bytes_out += len(body)
                        out.append(client.data_bytes(body))
                if decoder.done:
                    tail = rewriter.end()
                    if tail:
                        ex.bytes_out += len(tail)
                        out.append(client.data_bytes(tail))
                    ex.tool_calls = rewriter.tool_calls
                    out.append(client.end_bytes())
                    await _send_last(client, ex, out)
                    up.raw_done = not decoder.leftover
                    return
            if relayable and decoder.idle:
                plain = rewriter.plain_triggers() if client.chunked_out else None
                native = None if plain is None else (relaying.SSE, plain)
                data = await _relayed(client, up, ex, out, timer, rewrite_step, native)
            else:
                data = await _flush_and_read(client, up, ex, out, timer, True, wait_first)
            if not data:
                await _abort_stream(client, ex, ConnectionError("the engine closed mid-response"))
                raise StreamBroken("the engine closed mid-response")
            wait_first = len(data) < READ_BYTES
    await _timed_out(client, ex, timer, True)


async def _relay_after_keepalive(
    client: ClientSide, up: UpstreamConn, resp: h11.Response,
    fmt: toolcalls.ToolCallFormat | None, request_id: str, ex: Exchange,
) -> None:
    """Our 200 head is out: relay the engine's event stream, or turn its
    error answer into an error event."""
    if resp.status_code == 200:
        rewriter = toolcalls.StreamRewriter(fmt, request_id) if fmt is not None else None
        await _pump(client, up, ex, rewriter, None, _waited_comment(ex))
        return
    ex.status = resp.status_code
    body = await _read_whole(up, ex)
    ex.bytes_out += await send_stream_error(client, engine_error_body(resp.status_code, body) or body)


def _waited_comment(ex: Exchange) -> bytes:
    """An SSE comment before a stream's first event saying how long it waited
    for the engine (the header says it too, where clients cannot see it)."""
    if ex.waited_s <= 0:
        return b""
    return f": vllm-gateway: cold start, waited {ex.waited_s:.1f} s for the engine\n\n".encode()


async def _bad_gateway(client: ClientSide, ex: Exchange, cause: BaseException) -> None:
    """The engine's answer broke before any of it reached the client: a
    plain 502 instead of the head built for it (the connection closes)."""
    log.warning("the engine's answer is not valid HTTP: %s", cause)
    body = error_body(f"vllm-gateway: the engine's answer is not valid HTTP: {cause}", "upstream_error")
    ex.status = 502
    ex.bytes_out = 0
    head = (b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body))
    client.linger = True
    try:
        await send_all(client.stream, head + (b"" if client.method == b"HEAD" else body))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _abort_stream(
    client: ClientSide, ex: Exchange, cause: BaseException, at_boundary: bool = True,
    cut_reason: str | None = None,
) -> None:
    """The engine broke off mid-response, or a stop cut it (`cut_reason`).
    End the client's response cleanly: for an event stream an SSE error
    event first, then the body's proper end (the connection closes after
    it). Where a chunk was cut in the middle, only closing is left."""
    message = "vllm-gateway: the engine stopped responding mid-stream"
    ex.outcome = "engine_gone"
    if cut_reason is not None:
        message = cut_reason
        ex.outcome = "stopped"
    elif isinstance(cause, trio.TooSlowError):
        message = f"vllm-gateway: the engine sent nothing for {ex.read_timeout_s:g} s; it is restarted"
        ex.outcome = "timeout"
    elif isinstance(cause, h11.ProtocolError | ChunkedError):
        message = f"vllm-gateway: the engine's answer is not valid HTTP: {cause}"
    log.warning("engine response broke off after %d bytes: %s", ex.bytes_out,
                cut_reason or cause or "timeout")
    if not at_boundary:
        return
    try:
        if ex.event_stream and client.conn.our_state is h11.SEND_BODY:
            ex.bytes_out += await send_stream_error(client, error_body(message, "upstream_error"))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass


async def _read_whole(up: UpstreamConn, ex: Exchange) -> bytes:
    """The engine's whole response body (to rewrite it or quote it), bounded."""
    chunks: list[bytes] = []
    size = 0
    deadline = trio.current_time() + ex.read_timeout_s
    while True:
        try:
            event = await next_event(up.conn, up.stream, deadline)
        except h11.ProtocolError as e:
            raise UpstreamError(f"vllm-gateway: the engine's answer is not valid HTTP: {e}") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            if up.cut_reason is not None:
                raise EngineStopped(up.cut_reason) from None
            raise
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_REWRITE_BODY_BYTES:
                raise UpstreamError("vllm-gateway: the engine's response is too large to rewrite")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)


async def _relay_stream_rewritten(
    client: ClientSide, up: UpstreamConn, resp: h11.Response, headers: list[tuple[bytes, bytes]],
    fmt: toolcalls.ToolCallFormat, request_id: str, ex: Exchange,
) -> None:
    headers = [(n, v) for n, v in headers if n != b"content-length"]
    await _pump(client, up, ex, toolcalls.StreamRewriter(fmt, request_id),
                (resp.status_code, headers, resp.reason), _waited_comment(ex))


async def _relay_error(
    client: ClientSide, up: UpstreamConn, resp: h11.Response, headers: list[tuple[bytes, bytes]],
    ex: Exchange,
) -> None:
    """An error answer of the engine, passed on in OpenAI's error shape
    (FastAPI's `{"detail": ...}` is not), with its status and message."""
    body = await _read_whole(up, ex)
    shaped = engine_error_body(resp.status_code, body)
    if shaped is not None:
        body = shaped
        headers = [(n, v) for n, v in headers if n not in (b"content-type", b"content-length")]
        headers.append((b"content-type", b"application/json"))
    await _send_whole(client, (resp.status_code, headers, resp.reason), body, ex)


async def _send_whole(client: ClientSide, head: Head, body: bytes, ex: Exchange) -> None:
    """A response with a body the gateway made: head, body and end in one write."""
    status, headers, reason = head
    headers = [(n, v) for n, v in headers if n != b"content-length"]
    headers.append((b"content-length", b"%d" % len(body)))
    wire = client.head_bytes((status, headers, reason))
    wire += client.data_bytes(body) + client.end_bytes()
    await send_all(client.stream, wire)
    ex.bytes_out = len(body)


async def _relay_whole_rewritten(
    client: ClientSide, up: UpstreamConn, resp: h11.Response, headers: list[tuple[bytes, bytes]],
    fmt: toolcalls.ToolCallFormat, request_id: str, ex: Exchange,
) -> None:
    body, ex.tool_calls = toolcalls.rewrite_body(await _read_whole(up, ex), fmt, request_id)
    # one write, as for responses relayed unchanged
    await _send_whole(client, (resp.status_code, headers, resp.reason), body, ex)

