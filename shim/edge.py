"""The gateway's HTTP edge: accepts clients' connections and serves their
requests one after another. It reads each request head and body within
bounds of size and time, refuses what it must before the body is read
(unauthorised, too large, malformed), asks the gateway behind it
(`Served`) for the answer, sends the gateway's errors in OpenAI's shape,
and writes each request's log line. It knows no engine and no endpoint."""

from __future__ import annotations

import logging
import secrets
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import h11
import trio

from .config import GatewayConfig
from .dispatch import ADMIN_KINDS
from .errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    PayloadTooLarge,
    RequestTimeout,
    StreamBroken,
    UpstreamError,
    URITooLong,
    error_body,
)
from .http1 import ServerConnection
from .httpio import header, next_event
from .proxy import ClientSide, Exchange, outcome_of, send_stream_error
from .reqlog import RequestLog
from .routes import Kind, Route, classify
from .security import check_admin, check_client

# the name the request lines have always carried (the journal's LOGGER field)
log = logging.getLogger("vllm_gateway.server")
# log.info for the line each request writes, without its per-call overhead
_request_log = RequestLog(log, __file__, "_log_request")

# Bounds on what a client may send. Headers of OpenAI clients are ~1 KiB;
# bodies carry prompts and base64 images, so tens of MiB.
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024
# Longer request targets are refused (414); OpenAI API paths are short.
MAX_TARGET_BYTES = 8 * 1024
_OVERLOADED_BODY = error_body("vllm-gateway: too many open connections; try again", "engine_unavailable",
                              "too_many_connections")
OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_OVERLOADED_BODY)).encode() + b"\r\n\r\n"
    + _OVERLOADED_BODY
)
# Once its request head is in, a client must send the body within this
# (slow clients would otherwise hold connections forever). The head itself
# must come within KEEPALIVE_IDLE_S of the connection or the last answer.
REQUEST_READ_TIMEOUT_S = 60.0
# After an error answer that closes the connection, read (and drop) what the
# client still sends for a moment: closing with unread input makes the kernel
# send a reset, which can destroy the answer before the client reads it.
LINGER_S = 2.0
LINGER_MAX_BYTES = 64 * 1024 * 1024
# An idle keep-alive connection is closed after this.
KEEPALIVE_IDLE_S = 75.0


class Connections:
    """Clients' open connections, and when the last one opened or closed:
    what keeps the shim up (its idle exit, server.py). No engine sees them:
    a connection may carry no request yet, or only requests to the
    gateway's own endpoints. Requests in flight are the engines' own count.
    Only this class writes these fields; `on_change` is called when the
    count goes from 0 to 1 or back."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.open = 0
        self.last_change = trio.current_time()  # trio time
        self._on_change = on_change

    def opened(self) -> None:
        self.open += 1
        self.last_change = trio.current_time()
        if self.open == 1:
            self._on_change()

    def closed(self) -> None:
        self.open -= 1
        self.last_change = trio.current_time()
        if self.open == 0:
            self._on_change()

    @contextmanager
    def detached(self) -> Iterator[None]:
        """An open status page's stream: not a client that keeps the shim up."""
        self.open -= 1
        if self.open == 0:
            self._on_change()
        try:
            yield
        finally:
            self.open += 1


class Served(Protocol):
    """What the edge asks of the gateway behind it."""

    @property
    def cfg(self) -> GatewayConfig:
        """The configuration now (a reload replaces it): keys and limits."""
        ...

    async def answer(
        self, client: ClientSide, req: h11.Request, route: Route, body: bytes, request_id: str, ex: Exchange,
    ) -> Exchange:
        """Answer one request that passed the edge; `ex` is filled in as it goes."""
        ...

    def request_done(self, method: str, route: Route, ex: Exchange, seconds: float) -> None:
        """One request ended, however it did (metrics, the status page)."""
        ...


class Edge:
    """Serves each connection (`handle`, for trio.serve_listeners)."""

    def __init__(self, served: Served, connections: Connections) -> None:
        self.served = served
        self.connections = connections
        # request ids: a random prefix per shim and a counter (cheap, unique)
        self._id_prefix = f"req-{secrets.token_hex(4)}-"
        self._id_count = 0

    def _next_request_id(self) -> str:
        self._id_count += 1
        return f"{self._id_prefix}{self._id_count:x}"

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections.opened()
        conn = ServerConnection(max_incomplete_event_size=MAX_HEADER_BYTES)
        client = ClientSide(stream, conn)
        # the control socket is the only Unix socket we listen on
        client.control = getattr(getattr(stream, "socket", None), "family", None) == socket.AF_UNIX
        try:
            if self.connections.open > self.served.cfg.max_connections and not client.control:
                log.warning("refusing a connection: %d open (max_connections)", self.connections.open)
                client.linger = True
                await stream.send_all(OVERLOADED)
                return
            while True:
                if not await self._one_request(client):
                    break
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, StreamBroken):
            pass
        except Exception:
            # one broken exchange must never take the listener (and every
            # other client) down with it
            log.exception("unexpected error on a client connection; closing it")
        finally:
            self.connections.closed()
            with trio.CancelScope(shield=True):
                if client.linger:
                    await _linger(stream)
                await stream.aclose()

    async def _one_request(self, client: ClientSide) -> bool:
        """Serve one request on the connection; False when it should close."""
        conn = client.conn
        try:
            # a new cycle: the client may stay idle this long before its next request
            # (after an answer, it has rarely sent the next one yet: wait before reading)
            event = await next_event(conn, client.stream, trio.current_time() + KEEPALIVE_IDLE_S,
                                     wait_first=client.answered)
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return False
            assert isinstance(event, h11.Request)
            client.method = event.method
            route = classify(event.method.decode("ascii", "replace"), event.target.decode("latin-1"))
            # before the body is read: an unauthenticated or misdirected
            # request costs nothing, and never starts or wakes the engine
            self._check_access(client, event, route)
            if conn.client_is_waiting_for_100_continue:  # ready for the body: ask for it
                await client.send(h11.InformationalResponse(status_code=100, headers=[]))
            body = await self._read_body(client, trio.current_time() + REQUEST_READ_TIMEOUT_S)
        except trio.TooSlowError:
            if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                return False  # an idle keep-alive connection, closed quietly
            await self.send_error(client, RequestTimeout("vllm-gateway: the request was not sent in time"))
            return False
        except h11.RemoteProtocolError as e:
            err: GatewayError = HeadersTooLarge(f"vllm-gateway: {e}") if e.error_status_hint == 431 \
                else _bad_request(e)
            err.status = e.error_status_hint if e.error_status_hint >= 400 else 400
            await self.send_error(client, err, close=True)
            return False
        except GatewayError as e:  # access refused, target or body too large
            log.info("refused %s: %d %s", _peer(client), e.status, e.message)
            await self.send_error(client, e, close=True)
            return False
        await self._serve(client, event, route, body)
        client.answered = True
        return True

    def _check_access(self, client: ClientSide, req: h11.Request, route: Route) -> None:
        if len(req.target) > MAX_TARGET_BYTES:
            raise URITooLong(f"vllm-gateway: the request target is longer than {MAX_TARGET_BYTES} bytes")
        if route.kind in (Kind.HEALTH, Kind.PAGE, Kind.EVENTS):
            return  # liveness probes need no key; the page's data stream checks its own
        if route.kind in ADMIN_KINDS:
            check_admin(req.headers, self.served.cfg.admin_key, client.control)
        elif not client.control:
            check_client(req.headers, self.served.cfg.api_keys)

    async def _read_body(self, client: ClientSide, deadline: float) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await next_event(client.conn, client.stream, deadline)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY_BYTES:
                    raise PayloadTooLarge(
                        f"vllm-gateway: the request body is larger than {MAX_BODY_BYTES // 2**20} MiB"
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise h11.RemoteProtocolError("unexpected event in the request body")

    async def _serve(self, client: ClientSide, req: h11.Request, route: Route, body: bytes) -> None:
        t0 = trio.current_time()
        request_id = (header(req.headers, b"x-request-id") or b"").decode("latin-1")[:64] \
            or self._next_request_id()
        method = req.method.decode("ascii", "replace")
        ex = Exchange()
        try:
            try:
                ex = await self.served.answer(client, req, route, body, request_id, ex)
            except GatewayError as e:
                ex.outcome = outcome_of(e)
                if client.conn.our_state is h11.SEND_RESPONSE:
                    ex.status = e.status
                    ex.bytes_out = await self.send_error(client, e, request_id)
                else:
                    if ex.event_stream and client.conn.our_state is h11.SEND_BODY:
                        ex.bytes_out += await send_stream_error(client, e.body())
                    raise StreamBroken(e.message) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if ex.outcome == "complete":
                ex.outcome = "client_gone"
            raise
        except trio.Cancelled:
            if ex.outcome == "complete":
                ex.outcome = "cancelled"
            raise
        except BaseException:
            if ex.outcome == "complete":
                ex.outcome = "error"
            raise
        finally:
            self._log_request(method, route, request_id, ex, trio.current_time() - t0)

    def _log_request(self, method: str, route: Route, request_id: str, ex: Exchange, seconds: float) -> None:
        """The request's journal line and metrics, however it ended."""
        ms = seconds * 1000
        label = route.label
        self.served.request_done(method, route, ex, seconds)
        if not log.isEnabledFor(logging.INFO):
            return
        cold = f" cold_start_ms={ex.waited_s * 1000:.0f}" if ex.waited_s > 0 else ""
        tools = f" tool_calls={ex.tool_calls}" if ex.tool_calls else ""
        ended = f" outcome={ex.outcome}" if ex.outcome != "complete" else ""
        # journal fields: `journalctl --user -u vllm-gateway REQUEST_ID=...` finds one request
        fields = {
            "REQUEST_ID": request_id, "MODEL": ex.model or "", "STATUS": ex.status,
            "DURATION_MS": round(ms), "ROUTE": label, "OUTCOME": ex.outcome,
        }
        if ex.waited_s > 0:
            fields["COLD_START_MS"] = round(ex.waited_s * 1000)
        _request_log.info(sys._getframe().f_lineno, "%s %s %d %dB %.1fms id=%s%s%s%s",
                          (method, route.path, ex.status, ex.bytes_out, ms, request_id, cold, tools, ended),
                          fields)

    async def send_error(
        self, client: ClientSide, e: GatewayError, request_id: str = "-", close: bool = False
    ) -> int:
        """Answer with the error; the body's size."""
        # IDLE too: after a malformed request head h11 still lets us answer it
        if client.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return 0
        body = e.body()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += e.headers()
        if close or isinstance(e, UpstreamError | RequestTimeout) or e.status in (400, 408, 413, 414, 431):
            headers.append((b"connection", b"close"))
            client.linger = True
        try:
            await client.send(h11.Response(status_code=e.status, headers=headers))
            await client.send(h11.Data(data=b"" if is_head(client) else body))
            await client.send(h11.EndOfMessage())
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass
        if e.status >= 500:
            log.warning("request %s: %d %s", request_id, e.status, e.message)
        return 0 if is_head(client) else len(body)


async def _linger(stream: trio.SocketStream) -> None:
    with trio.move_on_after(LINGER_S):
        try:
            await stream.send_eof()
            drained = 0
            while drained < LINGER_MAX_BYTES:
                data = await stream.receive_some(65536)
                if not data:
                    break
                drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, AttributeError):
            pass


def _peer(client: ClientSide) -> str:
    if client.control:
        return "the control socket"
    try:
        host, port = client.stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (AttributeError, OSError, ValueError):
        return "a client"


def is_head(client: ClientSide) -> bool:
    return client.method == b"HEAD"


def _bad_request(e: h11.RemoteProtocolError) -> GatewayError:
    return BadRequest(f"vllm-gateway: malformed HTTP request: {e}")
