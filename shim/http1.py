"""HTTP/1.1 for the common case without h11's per-event cost; h11 for the rest.

Both ends of the proxy speak h11's API (``next_event``, ``send``, states),
through two subclasses of ``h11.Connection``. Every head is first checked by
shim/headcheck.py, the gateway's own strict rules (CRLF only, no obs-fold,
no control bytes, one unambiguous framing, the size limit): a head that
fails them is refused whatever parser would come next.

- Requests that pass are read here, except chunked bodies and HTTP/1.0,
  which go to h11 (the inherited implementation) for that one exchange;
  the next request on the connection starts here again.
- Responses from the engine are read here only: 1xx answers are skipped
  (101 is an error), 204 and 304 have no body, and a body is framed by its
  Content-Length, by chunked encoding (decoded as strictly as h11 does), or
  by the close.
Pure logic: no I/O.
"""

from __future__ import annotations

from typing import Any

import h11

from . import headcheck
from .chunked import ChunkedDecoder, ChunkedError
from .headcheck import HeadError

# h11.Connection's default bound on an incomplete head; the engine's heads
# are a few hundred bytes.
_H11_MAX_INCOMPLETE = 16 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_IDLE, _SEND_BODY, _DONE = h11.IDLE, h11.SEND_BODY, h11.DONE


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",")]


def _event(kind: Any, **fields: Any) -> Any:
    """An h11 event whose fields were checked already (by shim/headcheck.py,
    which is stricter than h11): h11's constructors would check again. The
    headers are a plain list of (lower-case name, value), as h11's iterate."""
    event = object.__new__(kind)
    for name, value in fields.items():
        object.__setattr__(event, name, value)
    return event


def _protocol_error(e: HeadError) -> h11.RemoteProtocolError:
    return h11.RemoteProtocolError(str(e), error_status_hint=e.status)


def render_head(first_line: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join([first_line, b"\r\n", *[b"%s: %s\r\n" % (n, v) for n, v in headers], b"\r\n"])


class ServerConnection(h11.Connection):
    """The gateway's end of a client connection (h11.SERVER), see the module
    docstring. Besides h11's API it offers `send_head`, `send_data` and
    `send_end`, which build bytes without h11 event objects."""

    def __init__(self, max_incomplete_event_size: int = _H11_MAX_INCOMPLETE) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self._max_head = max_incomplete_event_size
        self.h11 = False  # this exchange went to h11
        self._buf = b""
        self._eof = False
        self._checked = 0  # how much of an incomplete head was found clean
        self._target = b""  # the origin-form target of the exchange h11 reads
        self._their: Any = _IDLE
        self._our: Any = _IDLE
        self._keep_alive = True
        self._method = b""
        self._body_left = 0  # request body bytes still to come
        self._out_left = 0  # response body bytes still due (content-length framing)
        self._out_chunked = False

    # ---- state, as h11 reports it ----

    @property
    def their_state(self) -> Any:
        if self.h11:
            return super().their_state
        if self._their is _DONE and not self._keep_alive:
            return h11.MUST_CLOSE
        return self._their

    @property
    def our_state(self) -> Any:
        if self.h11:
            return super().our_state
        if self._our is _DONE and not self._keep_alive:
            return h11.MUST_CLOSE
        return self._our

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        if self.h11:
            return super().trailing_data
        return self._buf, self._eof

    def start_next_cycle(self) -> None:
        if self.h11:
            super().start_next_cycle()
            # back to our own reading: h11 keeps what it has not parsed yet
            rest, closed = super().trailing_data
            h11.Connection.__init__(self, h11.SERVER, max_incomplete_event_size=self._max_head)
            self.h11 = False
            self._buf, self._eof = rest, closed
            self._our = self._their = _IDLE
            self._keep_alive = True
            self._method = b""
            return
        if not (self._our is _DONE and self._their is _DONE and self._keep_alive):
            raise h11.LocalProtocolError("not in a reusable state")
        self._our = self._their = _IDLE
        self._method = b""

    # ---- receiving ----

    def receive_data(self, data: bytes) -> None:
        if self.h11:
            super().receive_data(data)
        elif data:
            if self._eof:
                raise RuntimeError("received close, then received more data?")
            self._buf = self._buf + data if self._buf else bytes(data)
        else:
            self._eof = True

    def next_event(self) -> Any:
        if self.h11:
            event = super().next_event()
            if type(event) is h11.Request and event.target != self._target:
                # an absolute-form target, routed by its path
                event = h11.Request(method=event.method, target=self._target, headers=list(event.headers),
                                    http_version=event.http_version)
            return event
        their = self._their
        if their is _IDLE:
            return self._next_request()
        if their is _SEND_BODY:
            left = self._body_left
            if not left:
                self._their = _DONE
                self.client_is_waiting_for_100_continue = False
                return h11.EndOfMessage()
            buf = self._buf
            if buf:
                self.client_is_waiting_for_100_continue = False
                if len(buf) <= left:
                    self._buf = b""
                    self._body_left = left - len(buf)
                    return h11.Data(data=buf)
                self._buf = buf[left:]
                self._body_left = 0
                return h11.Data(data=buf[:left])
            if self._eof:
                self._their = h11.ERROR
                raise h11.RemoteProtocolError("peer closed connection without sending complete message body")
            return h11.NEED_DATA
        if their is _DONE and self._buf:
            return h11.PAUSED
        if their is h11.CLOSED or (self._eof and not self._buf):
            return h11.ConnectionClosed()
        if their is h11.ERROR:
            raise h11.RemoteProtocolError("Can't receive data when peer state is ERROR")
        return h11.NEED_DATA

    def _next_request(self) -> Any:
        buf = self._buf
        try:
            end = headcheck.head_end(buf, self._max_head, self._checked)
            if end is None:
                self._checked = len(buf)
                headcheck.check_start(buf)
                if not self._eof:
                    return h11.NEED_DATA
                if not buf:
                    self._their = h11.CLOSED
                    return h11.ConnectionClosed()
                raise HeadError("the connection closed in the middle of a request head")
            head = headcheck.check_request(buf[:end])
        except HeadError as e:
            self._their = h11.ERROR
            raise _protocol_error(e) from None
        self._checked = 0
        if head.chunked or head.version != b"1.1":
            return self._to_h11(head.target)
        self._buf = buf[end:]
        self._method = head.method
        self._body_left = head.length or 0
        self._keep_alive = head.keep_alive
        self.client_is_waiting_for_100_continue = head.expect_continue and bool(self._body_left)
        self.their_http_version = b"1.1"
        self._their = _SEND_BODY
        self._our = h11.SEND_RESPONSE
        return _event(h11.Request, method=head.method, target=head.target, headers=head.headers,
                      http_version=b"1.1")

    def _to_h11(self, target: bytes) -> Any:
        """Hand this exchange (a head that passed our checks) to h11."""
        self.h11 = True
        self._target = target
        if self._buf:
            super().receive_data(self._buf)
        if self._eof:
            super().receive_data(b"")
        self._buf = b""
        return self.next_event()

    # ---- sending ----

    def send(self, event: Any) -> Any:
        if self.h11:
            return super().send(event)
        kind = type(event)
        if kind is h11.Response:
            return self.send_head(event.status_code, event.headers.raw_items(), event.reason)
        if kind is h11.Data:
            return self.send_data(event.data)
        if kind is h11.EndOfMessage:
            return self.send_end()
        if kind is h11.ConnectionClosed:
            self._our = h11.CLOSED
            return None
        if kind is h11.InformationalResponse and event.status_code == 100:
            if not self.client_is_waiting_for_100_continue:
                return b""  # nobody waits for it (h11 would refuse it; it harms nothing)
            self.client_is_waiting_for_100_continue = False
            return _CONTINUE
        self._our = h11.ERROR
        raise h11.LocalProtocolError(f"vllm-gateway: cannot send {kind.__name__} here")

    def send_head(self, status: int, headers: list[tuple[bytes, bytes]], reason: bytes = b"") -> bytes:
        """The response head's bytes. Framing follows h11's rules: HEAD, 204
        and 304 have no body; without Content-Length or Transfer-Encoding
        the body is chunked; Connection: close where keep-alive is off."""
        if self.h11:
            return super().send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
        if self._our not in (_IDLE, h11.SEND_RESPONSE) or not 200 <= status <= 999:
            self._our = h11.ERROR
            raise h11.LocalProtocolError("vllm-gateway: cannot send a response now")
        if self.client_is_waiting_for_100_continue:  # answered before the body: it may still come
            self.client_is_waiting_for_100_continue = False
            self._keep_alive = False
        length: int | None = None
        chunked = False
        connection: list[bytes] = []
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                length = int(value)
            elif lname == b"transfer-encoding":
                chunked = True
            elif lname == b"connection":
                connection += _tokens(value)
        if not (chunked or length is not None or status in (204, 304)):
            headers = [*headers, (b"Transfer-Encoding", b"chunked")]
            chunked = True
        elif chunked and length is not None:
            headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
        if not self._keep_alive:  # the request said close: so does the response
            tokens = sorted({t for t in connection if t != b"keep-alive"} | {b"close"})
            headers = [(n, v) for n, v in headers if n.lower() != b"connection"]
            headers.append((b"Connection", b", ".join(tokens)))
        elif b"close" in connection:
            self._keep_alive = False
        if self._method == b"HEAD" or status in (204, 304):
            chunked, length = False, 0
        self._out_chunked = chunked
        self._out_left = length or 0
        self._our = _SEND_BODY
        return render_head(b"HTTP/1.1 %d %s" % (status, reason), headers)

    @property
    def chunked_out(self) -> bool:
        """Whether `send_data` frames its data as one chunk ("%x\\r\\n" data "\\r\\n")."""
        return not self.h11 and self._our is _SEND_BODY and self._out_chunked

    def send_data(self, data: bytes) -> bytes:
        if self.h11:
            return super().send(h11.Data(data=data)) or b""
        if self._our is not _SEND_BODY:
            self._our = h11.ERROR
            raise h11.LocalProtocolError("vllm-gateway: cannot send body data now")
        if self._out_chunked:
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        self._out_left -= len(data)
        if self._out_left < 0:
            self._our = h11.ERROR
            raise h11.LocalProtocolError("Too much data for declared Content-Length")
        return bytes(data)

    def send_end(self) -> bytes:
        if self.h11:
            return super().send(h11.EndOfMessage()) or b""
        if self._our is not _SEND_BODY:
            self._our = h11.ERROR
            raise h11.LocalProtocolError("vllm-gateway: cannot end a body now")
        if self._out_chunked:
            self._our = _DONE
            return b"0\r\n\r\n"
        if self._out_left:
            self._our = h11.ERROR
            raise h11.LocalProtocolError("Too little data for declared Content-Length")
        self._our = _DONE
        return b""


class UpstreamConnection(h11.Connection):
    """The gateway's end of an engine connection (h11.CLIENT), see the module
    docstring: h11's API for reading, `send_request` to write a whole
    request. Every response is read here, never by h11, under the rules of
    shim/headcheck.py; anything else raises h11.RemoteProtocolError."""

    def __init__(self) -> None:
        super().__init__(h11.CLIENT)
        self._buf = b""
        self._eof = False
        self._checked = 0
        self._our: Any = _IDLE
        self._their: Any = _IDLE
        self._keep_alive = True
        self._method = b""
        self._body_left = 0
        self._to_close = False  # a body that ends with the connection
        self._chunks: ChunkedDecoder | None = None
        self.answered = False  # a byte of a response came

    @property
    def their_state(self) -> Any:
        if self._their is _DONE and not self._keep_alive:
            return h11.MUST_CLOSE
        return self._their

    @property
    def our_state(self) -> Any:
        if self._our is _DONE and not self._keep_alive:
            return h11.MUST_CLOSE
        return self._our

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        return self._buf, self._eof

    def start_next_cycle(self) -> None:
        if not (self._our is _DONE and self._their is _DONE and self._keep_alive):
            raise h11.LocalProtocolError("not in a reusable state")
        self._our = self._their = _IDLE
        self._method = b""
        self.answered = False

    def send(self, event: Any) -> Any:
        raise h11.LocalProtocolError("vllm-gateway: use send_request on an engine connection")

    def send_request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                     body: bytes) -> bytes:
        """Head and body of a request whose headers carry its Content-Length
        (and Host first, where h11 puts it). The names and values must be
        valid: they come from a checked request."""
        if self._our is not _IDLE:
            raise h11.LocalProtocolError("vllm-gateway: a request is already under way")
        self._method = method
        self._our = _DONE
        self._their = h11.SEND_RESPONSE
        for name, value in headers:
            if name == b"connection" and b"close" in _tokens(value):
                self._keep_alive = False
        return render_head(b"%s %s HTTP/1.1" % (method, target), headers) + body

    def receive_data(self, data: bytes) -> None:
        if data:
            if self._eof:
                raise RuntimeError("received close, then received more data?")
            self._buf = self._buf + data if self._buf else bytes(data)
            self.answered = True
        else:
            self._eof = True

    def _error(self, message: str) -> h11.RemoteProtocolError:
        self._their = h11.ERROR
        self._keep_alive = False
        return h11.RemoteProtocolError(message)

    def next_event(self) -> Any:
        their = self._their
        if their is h11.SEND_RESPONSE:
            return self._next_response()
        if their is _SEND_BODY:
            chunks = self._chunks
            if chunks is not None:
                return self._next_chunked(chunks)
            buf = self._buf
            if self._to_close:
                if buf:
                    self._buf = b""
                    return h11.Data(data=buf)
                if self._eof:
                    self._their = _DONE
                    return h11.EndOfMessage()
                return h11.NEED_DATA
            left = self._body_left
            if not left:
                self._their = _DONE
                return h11.EndOfMessage()
            if buf:
                if len(buf) <= left:
                    self._buf = b""
                    self._body_left = left - len(buf)
                    return h11.Data(data=buf)
                self._buf = buf[left:]
                self._body_left = 0
                return h11.Data(data=buf[:left])
            if self._eof:
                raise self._error("peer closed connection without sending complete message body")
            return h11.NEED_DATA
        if their is _DONE and self._buf:
            return h11.PAUSED
        if their is h11.ERROR:
            raise h11.RemoteProtocolError("Can't receive data when peer state is ERROR")
        if self._eof and not self._buf:
            return h11.ConnectionClosed()
        return h11.NEED_DATA

    def _next_chunked(self, chunks: ChunkedDecoder) -> Any:
        if chunks.error:
            raise self._error(chunks.error)
        if chunks.done:
            self._their = _DONE
            self._chunks = None
            return h11.EndOfMessage()
        buf = self._buf
        if buf:
            self._buf = b""
            try:
                data = chunks.feed(buf)
            except ChunkedError as e:
                raise self._error(str(e)) from None
            if chunks.done:
                self._buf = chunks.leftover
            if data:
                return h11.Data(data=data)
            return self._next_chunked(chunks)
        if self._eof:
            raise self._error("peer closed connection without sending complete message body")
        return h11.NEED_DATA

    def _next_response(self) -> Any:
        while True:
            buf = self._buf
            try:
                end = headcheck.head_end(buf, _H11_MAX_INCOMPLETE, self._checked)
                if end is None:
                    self._checked = len(buf)
                    if self._eof:
                        raise self._error("the engine closed the connection before a complete response"
                                          if buf else "the engine closed the connection without answering")
                    return h11.NEED_DATA
                head = headcheck.check_response(buf[:end])
            except HeadError as e:
                raise self._error(f"the engine's response head: {e}") from None
            self._checked = 0
            self._buf = buf[end:]
            status = head.status
            if status < 100 or status == 101:
                raise self._error(f"the engine answered with status {status}")
            if status >= 200:
                break
            # 100 Continue and other interim answers: the final one follows
        headers = head.headers
        bodiless = self._method == b"HEAD" or status in (204, 304)
        if bodiless:  # no body, whatever the headers say; none of them goes on
            headers = [(n, v) for n, v in headers if n not in (b"content-length", b"transfer-encoding")]
        elif head.chunked:
            headers = [(n, b"chunked" if n == b"transfer-encoding" else v) for n, v in headers]
        self._keep_alive = head.keep_alive and (bodiless or head.chunked or head.length is not None)
        self._body_left = 0 if bodiless else head.length or 0
        self._chunks = ChunkedDecoder() if head.chunked and not bodiless else None
        self._to_close = not bodiless and not head.chunked and head.length is None
        self.their_http_version = head.version
        self._their = _SEND_BODY
        return _event(h11.Response, status_code=status, headers=headers, reason=head.reason,
                      http_version=head.version)
