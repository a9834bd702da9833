"""HTTP/1.1 for the common case without h11's per-event cost; h11 for the rest.

Both ends of the proxy speak h11's API (``next_event``, ``send``, states),
through two subclasses of ``h11.Connection``. Each starts every exchange in a
fast mode that accepts only the plain shape nearly all traffic has, checked
strictly:

- requests: ``METHOD SP TARGET SP HTTP/1.1``, token methods other than
  CONNECT, visible-ASCII targets, one Host, at most one plain decimal
  Content-Length, and no Transfer-Encoding, Expect or Upgrade;
- responses: ``HTTP/1.1`` with a status from 200 to 599 other than 204 and
  304, and a body framed by one decimal Content-Length or by
  ``Transfer-Encoding: chunked``;
- header lines of a token, a colon and visible ASCII (or obs-text), CRLF line
  ends only, the whole head under the size limit.

Anything else is handed, untouched, to h11 (the inherited implementation) at
the start of the exchange, and that connection stays with h11 from then on:
its parsing rules, limits and error answers apply exactly as before. So the
fast mode never has to get an unusual request right, only to recognise it.
Pure logic: no I/O.
"""

from __future__ import annotations

import re
from typing import Any

import h11
from h11._headers import Headers  # h11's own header list; built directly to skip re-validation

from .chunked import ChunkedDecoder, ChunkedError

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_VCHAR = rb"[\x21-\x7e\x80-\xff]"
_HEADER_LINE = rb"(?:" + _TOKEN + rb":[ \t]*(?:" + _VCHAR + rb"+(?:[ \t]+" + _VCHAR + rb"+)*)?[ \t]*\r\n)"
# A whole head, CRLF-terminated lines: one C-speed check of every line, then
# one call that splits the (valid) header lines into names and values.
_REQUEST_HEAD = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1\r\n(" + _HEADER_LINE + rb"*)")
_RESPONSE_HEAD = re.compile(
    rb"HTTP/1\.1 ([2-5][0-9][0-9])(?: ([\t\x20-\x7e]*))?\r\n(" + _HEADER_LINE + rb"*)"
)
_HEADER_FIELDS = re.compile(rb"([^:]+):[ \t]*(.*?)[ \t]*\r\n")
# Header names that send a request or a response to h11.
_UNUSUAL_REQUEST = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
# Content-Length longer than this is h11's business (and refused there).
_MAX_LENGTH_DIGITS = 20
# h11.Connection's default bound on an incomplete head
_H11_MAX_INCOMPLETE = 16 * 1024

_IDLE, _SEND_BODY, _DONE = h11.IDLE, h11.SEND_BODY, h11.DONE


class FastHeaders(Headers):
    """h11's Headers, iterated as a plain list of (name, value) pairs:
    h11's own iteration goes through Sequence.__getitem__, pair by pair."""

    __slots__ = ("_pairs",)

    def __init__(self, full_items: list[tuple[bytes, bytes, bytes]]) -> None:
        super().__init__(full_items)
        self._pairs = [(name, value) for _raw, name, value in full_items]

    def __iter__(self) -> Any:
        return iter(self._pairs)


def _header_items(block: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(raw name, lower-case name, value) of each line of a checked header block."""
    return [(raw, raw.lower(), value) for raw, value in _HEADER_FIELDS.findall(block)]


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",")]


def _content_length(value: bytes) -> int | None:
    if not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
        return None
    return int(value)


def parse_request(head: bytes) -> tuple[h11.Request, int, bool] | None:
    """A plain request head (up to its last line's CRLF, the empty line
    excluded) -> (request, body length, keep-alive); None when it is not plain."""
    m = _REQUEST_HEAD.fullmatch(head)
    if m is None:
        return None
    method, target, block = m.groups()
    if method == b"CONNECT":
        return None
    items = _header_items(block)
    hosts = 0
    length: int | None = None
    keep_alive = True
    for _raw, name, value in items:
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if length is not None:
                return None
            length = _content_length(value)
            if length is None:
                return None
        elif name == b"connection":
            if b"close" in _tokens(value):
                keep_alive = False
        elif name in _UNUSUAL_REQUEST:
            return None
    if hosts != 1:
        return None
    return _event(h11.Request, method=method, target=target, headers=FastHeaders(items),
                  http_version=b"1.1"), length or 0, keep_alive


def _event(kind: Any, **fields: Any) -> Any:
    """An h11 event whose fields were checked already (by the patterns above,
    which are stricter than h11's): h11's constructors would check again."""
    event = object.__new__(kind)
    for name, value in fields.items():
        object.__setattr__(event, name, value)
    return event


def render_head(first_line: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join([first_line, b"\r\n", *[b"%s: %s\r\n" % (n, v) for n, v in headers], b"\r\n"])


class ServerConnection(h11.Connection):
    """The gateway's end of a client connection (h11.SERVER), see the module
    docstring. Besides h11's API it offers `send_head`, `send_data` and
    `send_end`, which build bytes without h11 event objects."""

    def __init__(self, max_incomplete_event_size: int = _H11_MAX_INCOMPLETE) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self._max_head = max_incomplete_event_size
        self.h11 = False  # the connection went to h11 for good
        self._buf = b""
        self._eof = False
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
            return super().next_event()
        their = self._their
        if their is _IDLE:
            return self._next_request()
        if their is _SEND_BODY:
            left = self._body_left
            if not left:
                self._their = _DONE
                return h11.EndOfMessage()
            buf = self._buf
            if buf:
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
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if not buf and self._eof:
                self._their = h11.CLOSED
                return h11.ConnectionClosed()
            # an incomplete head that is too long, cut off, ended by bare
            # LFs, or that starts with a control byte (h11 refuses that early)
            if self._eof or len(buf) > self._max_head or b"\n\n" in buf or b"\n\r\n" in buf \
                    or (buf and buf[0] < 0x21):
                return self._to_h11()
            return h11.NEED_DATA
        if end + 4 > self._max_head:
            return self._to_h11()
        parsed = parse_request(buf[:end + 2])
        if parsed is None:
            return self._to_h11()
        req, self._body_left, self._keep_alive = parsed
        self._buf = buf[end + 4:]
        self._method = req.method
        self.their_http_version = b"1.1"
        self._their = _SEND_BODY
        self._our = h11.SEND_RESPONSE
        return req

    def _to_h11(self) -> Any:
        """Hand the connection to h11 from this request on."""
        self.h11 = True
        if self._buf:
            super().receive_data(self._buf)
        if self._eof:
            super().receive_data(b"")
        self._buf = b""
        return super().next_event()

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
    docstring. `send_request` writes a whole request without h11 events;
    should the response be unusual, h11 replays that request into its own
    state (without sending it again) and parses the response."""

    def __init__(self) -> None:
        super().__init__(h11.CLIENT)
        self.h11 = False
        self._buf = b""
        self._eof = False
        self._our: Any = _IDLE
        self._their: Any = _IDLE
        self._keep_alive = True
        self._request: tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes] | None = None
        self._body_left = 0
        self._chunks: ChunkedDecoder | None = None

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
            return
        if not (self._our is _DONE and self._their is _DONE and self._keep_alive):
            raise h11.LocalProtocolError("not in a reusable state")
        self._our = self._their = _IDLE
        self._request = None

    def send_request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                     body: bytes) -> bytes:
        """Head and body of a request whose headers carry its Content-Length
        (and Host first, where h11 puts it). The names and values must be
        valid: they come from a parsed request."""
        if self.h11:
            out = super().send(h11.Request(method=method, target=target, headers=headers)) or b""
            out += super().send(h11.Data(data=body)) or b""
            return out + (super().send(h11.EndOfMessage()) or b"")
        if self._our is not _IDLE:
            raise h11.LocalProtocolError("vllm-gateway: a request is already under way")
        self._request = (method, target, headers, body)
        self._our = _DONE
        self._their = h11.SEND_RESPONSE
        for name, value in headers:
            if name == b"connection" and b"close" in _tokens(value):
                self._keep_alive = False
        return render_head(b"%s %s HTTP/1.1" % (method, target), headers) + body

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
            return super().next_event()
        their = self._their
        if their is h11.SEND_RESPONSE:
            return self._next_response()
        if their is _SEND_BODY:
            chunks = self._chunks
            if chunks is not None:
                return self._next_chunked(chunks)
            left = self._body_left
            if not left:
                self._their = _DONE
                return h11.EndOfMessage()
            buf = self._buf
            if buf:
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
        if their is h11.ERROR:
            raise h11.RemoteProtocolError("Can't receive data when peer state is ERROR")
        if self._eof and not self._buf:
            return h11.ConnectionClosed()
        return h11.NEED_DATA

    def _next_chunked(self, chunks: ChunkedDecoder) -> Any:
        if chunks.error:
            self._their = h11.ERROR
            raise h11.RemoteProtocolError(chunks.error)
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
                self._their = h11.ERROR
                raise h11.RemoteProtocolError(str(e)) from None
            if chunks.done:
                self._buf = chunks.leftover
            if data:
                return h11.Data(data=data)
            return self._next_chunked(chunks)
        if self._eof:
            self._their = h11.ERROR
            raise h11.RemoteProtocolError("peer closed connection without sending complete message body")
        return h11.NEED_DATA

    def _next_response(self) -> Any:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if self._eof or len(buf) > _H11_MAX_INCOMPLETE or b"\n\n" in buf \
                    or b"\n\r\n" in buf or (buf and buf[0] < 0x21):
                return self._to_h11()
            return h11.NEED_DATA
        m = _RESPONSE_HEAD.fullmatch(buf, 0, end + 2)
        if m is None or self._request is None or self._request[0] == b"HEAD":
            return self._to_h11()
        status = int(m.group(1))
        items = _header_items(m.group(3))
        if status in (204, 304):
            return self._to_h11()
        length: int | None = None
        chunked = False
        for _raw, name, value in items:
            if name == b"content-length":
                if length is not None:
                    return self._to_h11()
                length = _content_length(value)
                if length is None:
                    return self._to_h11()
            elif name == b"transfer-encoding":
                if chunked or value.lower() != b"chunked":
                    return self._to_h11()
                chunked = True
                if value != b"chunked":  # h11 reports it lower-cased
                    items = [(r, n, b"chunked" if n == name else v) for r, n, v in items]
            elif name == b"connection":
                if b"close" in _tokens(value):
                    self._keep_alive = False
        if chunked == (length is not None):  # neither (read to the close) or both
            return self._to_h11()
        resp = _event(h11.Response, status_code=status, headers=FastHeaders(items), reason=m.group(2) or b"",
                      http_version=b"1.1")
        self._buf = buf[end + 4:]
        self.their_http_version = b"1.1"
        self._their = _SEND_BODY
        self._body_left = length or 0
        self._chunks = ChunkedDecoder() if chunked else None
        return resp

    def _to_h11(self) -> Any:
        """Hand the exchange to h11: replay the request into its state (the
        bytes it returns went out already), then let it parse the response."""
        assert self._request is not None
        self.h11 = True
        method, target, headers, body = self._request
        super().send(h11.Request(method=method, target=target, headers=headers))
        super().send(h11.Data(data=body))
        super().send(h11.EndOfMessage())
        if self._buf:
            super().receive_data(self._buf)
        if self._eof:
            super().receive_data(b"")
        self._buf = b""
        return super().next_event()
