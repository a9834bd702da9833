"""Forwarding one request to the engine and its response back, with h11 on
both sides. Bodies of requests are buffered (bounded) so that a request can
wait through a cold start and be retried once; responses stream through as
they arrive, with backpressure both ways."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import h11
import trio

from . import toolcalls
from .engine import Engine
from .errors import BadRequest, GatewayError, UpstreamError, UpstreamTimeout, error_body
from .httpio import end_to_end_headers, header, next_event, send
from .lifecycle import State
from .routes import CHAT, Route
from .upstream import UpstreamConn

log = logging.getLogger("vllm_gateway.proxy")

# Once the engine took the request, it may think long before the first byte
# (a long prompt's prefill); between streamed bytes it is quick. A silent
# engine past this is treated as hung.
UPSTREAM_READ_TIMEOUT_S = 600.0
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


class ClientSide:
    def __init__(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn
        self.method = b""  # of the request being served
        self.control = False  # on the local control socket
        self.linger = False  # drain the client's input before closing

    async def send(self, event: h11.Event) -> None:
        await send(self.conn, self.stream, event)


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
) -> Exchange:
    ex = Exchange()
    fmt = toolcalls.get_format(engine.cfg.tool_call_format) if route.path == CHAT else None
    if fmt is not None:
        body = toolcalls.adapt_request(body, fmt)
        if not _client_allows_tool_calls(parsed):
            fmt = None  # as OpenAI and vLLM do: no tools, or "none", means text only
    headers = [(n, v) for n, v in end_to_end_headers(req.headers) if n not in (b"host", b"content-length")]
    headers += [
        (b"host", f"127.0.0.1:{engine.cfg.port}".encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    if header(req.headers, b"x-request-id") is None:
        headers.append((b"x-request-id", request_id.encode()))
    up_req = h11.Request(method=req.method, target=route.target.encode(), headers=headers)

    if keepalive_s and parsed is not None and parsed.get("stream") is True and not engine.ready:
        try:
            ex.waited_s += await _wait_with_keepalive(engine, client, max_waiting, keepalive_s, ex)
        except GatewayError as e:
            if not ex.head_sent:
                raise
            await _send_stream_error(client, e.body())
            ex.status = e.status
            return ex

    retried = False
    while True:
        # the lease keeps the engine awake (no sleep) until the response is relayed
        async with engine.lease(max_waiting) as waited:
            ex.waited_s += waited
            try:
                up, resp = await _send_request(engine, up_req, body)
            except _BeforeResponse as e:
                if retried:
                    raise UpstreamError(f"vllm-gateway: cannot reach the engine: {e}") from None
                log.info("engine connection failed before a response (%s); retrying once", e)
            else:
                try:
                    await _relay(engine, client, up, resp, fmt, request_id, ex)
                except BaseException:
                    up.close()
                    raise
                engine.upstream.release(up)
                return ex
        retried = True
        await engine.wait_changed(RETRY_SETTLE_S)


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


async def _send_stream_error(client: ClientSide, error_json: bytes) -> None:
    """End an event stream whose head went out with an error event (OpenAI's
    clients raise it as an APIError)."""
    await client.send(h11.Data(data=b"data: " + error_json + b"\n\n"))
    await client.send(h11.EndOfMessage())


class _BeforeResponse(Exception):
    """The engine connection failed before any response byte: safe to retry."""


async def _send_request(
    engine: Engine, up_req: h11.Request, body: bytes
) -> tuple[UpstreamConn, h11.Response]:
    """Send the request and read the response head. A reused keep-alive
    connection that the engine had closed is replaced at once."""
    while True:
        up: UpstreamConn | None = None
        try:
            up = await engine.upstream.connect()
            await send(up.conn, up.stream, up_req)
            await send(up.conn, up.stream, h11.Data(data=body))
            await send(up.conn, up.stream, h11.EndOfMessage())
            with trio.fail_after(UPSTREAM_READ_TIMEOUT_S):
                event = await next_event(up.conn, up.stream)
            if not isinstance(event, h11.Response):
                raise UpstreamError(f"vllm-gateway: the engine answered with {type(event).__name__}")
            return up, event
        except trio.TooSlowError:
            assert up is not None
            up.close()
            raise UpstreamTimeout(
                f"vllm-gateway: the engine sent nothing for {UPSTREAM_READ_TIMEOUT_S:g} s"
            ) from None
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as e:
            if up is not None:
                up.close()
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
    rewrite = fmt is not None and resp.status_code == 200
    if rewrite and ctype.startswith(b"text/event-stream"):
        await _relay_stream_rewritten(client, up, resp, headers, fmt, request_id, ex)  # type: ignore[arg-type]
    elif rewrite and ctype.startswith(b"application/json"):
        await _relay_whole_rewritten(client, up, resp, headers, fmt, request_id, ex)  # type: ignore[arg-type]
    else:
        await client.send(h11.Response(status_code=resp.status_code, headers=headers, reason=resp.reason))
        await _pump(client, up, ex, None)


async def _pump(
    client: ClientSide, up: UpstreamConn, ex: Exchange, rewriter: toolcalls.StreamRewriter | None
) -> None:
    """Move body bytes from the engine to the client until the end."""
    while True:
        try:
            with trio.fail_after(UPSTREAM_READ_TIMEOUT_S):
                event = await next_event(up.conn, up.stream)
        except (trio.TooSlowError, OSError, trio.BrokenResourceError, h11.ProtocolError) as e:
            await _abort_stream(client, ex, e)
            raise _StreamBroken(str(e)) from None
        if isinstance(event, h11.Data):
            data = rewriter.feed(bytes(event.data)) if rewriter else event.data
            if data:
                ex.bytes_out += len(data)
                await client.send(h11.Data(data=data))
        elif isinstance(event, h11.EndOfMessage):
            if rewriter:
                tail = rewriter.end()
                if tail:
                    ex.bytes_out += len(tail)
                    await client.send(h11.Data(data=tail))
                ex.tool_calls = rewriter.tool_calls
            await client.send(h11.EndOfMessage())
            return


async def _relay_after_keepalive(
    client: ClientSide, up: UpstreamConn, resp: h11.Response,
    fmt: toolcalls.ToolCallFormat | None, request_id: str, ex: Exchange,
) -> None:
    """Our 200 head is out: relay the engine's event stream, or turn its
    error answer into an error event."""
    if resp.status_code == 200:
        rewriter = toolcalls.StreamRewriter(fmt, request_id) if fmt is not None else None
        await _pump(client, up, ex, rewriter)
        return
    ex.status = resp.status_code
    chunks: list[bytes] = []
    while True:
        with trio.fail_after(UPSTREAM_READ_TIMEOUT_S):
            event = await next_event(up.conn, up.stream)
        if isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            break
    body = b"".join(chunks)
    try:
        json.loads(body)
    except ValueError:
        body = error_body(f"the engine answered {resp.status_code}: {body[:500].decode(errors='replace')}",
                          "upstream_error")
    await _send_stream_error(client, body)


class _StreamBroken(Exception):
    """The engine's response broke off after the client got its head."""


async def _abort_stream(client: ClientSide, ex: Exchange, cause: BaseException) -> None:
    """The engine broke off mid-response. For an event stream, tell the client
    in-band (an SSE error event) before the connection closes."""
    log.warning("engine response broke off after %d bytes: %s", ex.bytes_out, cause or "timeout")
    message = "vllm-gateway: the engine stopped responding mid-stream"
    if isinstance(cause, trio.TooSlowError):
        message = f"vllm-gateway: the engine sent nothing for {UPSTREAM_READ_TIMEOUT_S:g} s"
    event = b"data: " + error_body(message, "upstream_error") + b"\n\n"
    try:
        await client.send(h11.Data(data=event))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass


async def _relay_stream_rewritten(
    client: ClientSide, up: UpstreamConn, resp: h11.Response, headers: list[tuple[bytes, bytes]],
    fmt: toolcalls.ToolCallFormat, request_id: str, ex: Exchange,
) -> None:
    headers = [(n, v) for n, v in headers if n != b"content-length"]
    await client.send(h11.Response(status_code=resp.status_code, headers=headers, reason=resp.reason))
    await _pump(client, up, ex, toolcalls.StreamRewriter(fmt, request_id))


async def _relay_whole_rewritten(
    client: ClientSide, up: UpstreamConn, resp: h11.Response, headers: list[tuple[bytes, bytes]],
    fmt: toolcalls.ToolCallFormat, request_id: str, ex: Exchange,
) -> None:
    chunks: list[bytes] = []
    size = 0
    while True:
        with trio.fail_after(UPSTREAM_READ_TIMEOUT_S):
            event = await next_event(up.conn, up.stream)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_REWRITE_BODY_BYTES:
                raise UpstreamError("vllm-gateway: the engine's response is too large to rewrite")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            break
    body, ex.tool_calls = toolcalls.rewrite_body(b"".join(chunks), fmt, request_id)
    headers = [(n, v) for n, v in headers if n != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await client.send(h11.Response(status_code=resp.status_code, headers=headers, reason=resp.reason))
    await client.send(h11.Data(data=body))
    await client.send(h11.EndOfMessage())
    ex.bytes_out = len(body)


def json_object_or_error(body: bytes) -> GatewayError | dict[str, object]:
    """Parse a request body that must be a JSON object; the error to answer otherwise."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return BadRequest(f"vllm-gateway: the request body is not valid JSON: {e}")
    if not isinstance(value, dict):
        return BadRequest("vllm-gateway: the request body must be a JSON object")
    return value
