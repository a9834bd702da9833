"""The gateway's own rules for message heads, checked before any parser sees
them: one decision for the fast path and for h11 alike, on both sides of the
proxy. Pure logic: bytes in, a checked head or `HeadError` out; no I/O.

A head passes only in the plain shape of RFC 9112 that nothing downstream can
read two ways:

- lines end with CRLF only: a bare LF or a bare CR anywhere refuses the head,
  and so does a line folded onto the one before (obs-fold);
- a request line `METHOD SP TARGET SP HTTP/1.x` (another version: 505), a
  status line `HTTP/1.x DDD reason`;
- header lines `name: value`, a token for the name (no space before the
  colon), no control byte (0x00-0x1f but HTAB, or 0x7f) in the value;
- at most one Content-Length, plain digits; never together with
  Transfer-Encoding; Transfer-Encoding only as `chunked`, once, in HTTP/1.1
  (another coding before it: 501, as RFC 9112 section 6.1 says);
- an HTTP/1.1 request with exactly one Host;
- the whole head within the size limit (431), however it arrives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
# A version of the right shape but another number: 505, not 400.
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(.*?)[ \t]*")
# What a field value may hold: visible ASCII, obs-text, space and HTAB.
_TOKEN_BYTE = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]")
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_MAX_LENGTH_DIGITS = 19  # fits in 63 bits; anything longer is no body size


class HeadError(Exception):
    """A head the gateway refuses; `status` is the answer it gets (400, 431,
    501, 505 for requests; an engine's bad head ends as 502)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestHead:
    method: bytes
    target: bytes  # origin-form: an absolute-form target is reduced to its path
    version: bytes  # b"1.0" or b"1.1"
    headers: list[tuple[bytes, bytes]]  # (lower-case name, value)
    raw_names: list[bytes]
    length: int | None  # Content-Length
    chunked: bool
    expect_continue: bool
    keep_alive: bool


@dataclass(frozen=True)
class ResponseHead:
    status: int
    reason: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    length: int | None
    chunked: bool
    keep_alive: bool


def head_end(buf: bytes, max_bytes: int, checked: int = 0) -> int | None:
    """Where the head in `buf` ends (the index after its empty line), or None
    while it is incomplete. Raises HeadError for a bare LF or CR in the head
    or a head over `max_bytes`. `checked`: a prefix already found clean (a
    caller that feeds bytes as they come passes what it passed before, so
    that a head sent byte by byte costs no more than one sent whole)."""
    start = max(0, checked - 3)
    if buf[start:start + 1] == b"\n":
        start -= 1  # keep each CRLF whole
    end = buf.find(b"\r\n\r\n", start)
    stop = len(buf) if end < 0 else end + 2
    if (end + 4 if end >= 0 else len(buf)) > max_bytes:
        raise HeadError(f"the head is larger than {max_bytes // 1024} KiB", 431)
    part = buf[start:stop]
    crlf = part.count(b"\r\n")
    if part.count(b"\n") != crlf:
        raise HeadError("a line of the head ends with a bare LF")
    cr = part.count(b"\r")
    if cr != crlf and not (cr == crlf + 1 and end < 0 and part.endswith(b"\r")):
        raise HeadError("the head holds a bare CR")
    return None if end < 0 else end + 4


def check_start(buf: bytes) -> None:
    """Refuse an incomplete request head early, once its first line cannot
    be a request line any more (as h11 does): what comes after cannot help."""
    line_end = buf.find(b"\r\n")
    if line_end >= 0:
        _request_line(buf[:line_end])
    elif buf and _TOKEN_BYTE.match(buf) is None:
        raise HeadError(f"malformed request line {buf[:60]!r}")


def _lines(head: bytes) -> list[bytes]:
    """The lines of a complete head (ended by its empty line), CRLF removed."""
    return head[:-4].split(b"\r\n")


def _fields(lines: list[bytes]) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    raw_names: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HeadError("a header line is folded onto the one before (obs-fold)")
        m = _HEADER_LINE.fullmatch(line)
        if m is None:
            raise HeadError(f"malformed header line {line[:40]!r}")
        name, value = m.groups()
        if _BAD_VALUE_BYTE.search(value):
            raise HeadError(f"a control byte in the value of {name[:40].decode()!r}")
        raw_names.append(name)
        headers.append((name.lower(), value))
    return headers, raw_names


def _framing(headers: list[tuple[bytes, bytes]], version: bytes, what: str) -> tuple[int | None, bool]:
    """(Content-Length, chunked) of a head, refusing every ambiguous framing."""
    lengths = [v for n, v in headers if n == b"content-length"]
    codings = [c.strip().lower() for n, v in headers if n == b"transfer-encoding" for c in v.split(b",")]
    codings = [c for c in codings if c]
    if lengths and any(n == b"transfer-encoding" for n, _ in headers):
        raise HeadError(f"the {what} has both Content-Length and Transfer-Encoding")
    if len(lengths) > 1:
        raise HeadError(f"the {what} has more than one Content-Length")
    length: int | None = None
    if lengths:
        value = lengths[0]
        if not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
            raise HeadError(f"the {what}'s Content-Length is not a number: {value[:40]!r}")
        length = int(value)
    if any(n == b"transfer-encoding" for n, _ in headers):
        if version != b"1.1":
            raise HeadError(f"Transfer-Encoding in an HTTP/{version.decode()} {what}")
        if not codings or codings[-1] != b"chunked":
            raise HeadError(f"the {what}'s Transfer-Encoding does not end with chunked")
        if codings.count(b"chunked") > 1:
            raise HeadError(f"the {what} is chunked more than once")
        if len(codings) > 1:
            raise HeadError("Only Transfer-Encoding: chunked is supported", 501)
        return None, True
    return length, False


def _connection_close(headers: list[tuple[bytes, bytes]], version: bytes) -> bool:
    tokens = {t.strip().lower() for n, v in headers if n == b"connection" for t in v.split(b",")}
    return b"close" in tokens or (version == b"1.0" and b"keep-alive" not in tokens)


def origin_form(target: bytes) -> bytes:
    """An absolute-form target (`http://host/path?q`), which RFC 9112
    section 3.2.2 says a server must accept, as the path it names; any
    other target unchanged."""
    lower = target[:8].lower()
    if not (lower.startswith(b"http://") or lower.startswith(b"https://")):
        return target
    rest = target[target.index(b"//") + 2:]
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    if not rest[:cut]:
        raise HeadError("an absolute-form target without a host")
    path = rest[cut:]
    return path if path.startswith(b"/") else b"/" + path


def _request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        raise HeadError(f"malformed request line {line[:60]!r}")
    method, target, major, minor = m.groups()
    version = major + b"." + minor
    if version not in (b"1.0", b"1.1"):
        raise HeadError(f"HTTP/{version.decode()} is not supported (HTTP/1.0 and 1.1 are)", 505)
    return method, target, version


def check_request(head: bytes) -> RequestHead:
    """A complete request head (as `head_end` found it) checked whole."""
    request_line, *lines = _lines(head)
    method, target, version = _request_line(request_line)
    headers, raw_names = _fields(lines)
    if version == b"1.1" and sum(1 for n, _ in headers if n == b"host") != 1:
        raise HeadError("an HTTP/1.1 request needs exactly one Host header")
    length, chunked = _framing(headers, version, "request")
    expect = [v.strip().lower() for n, v in headers if n == b"expect"]
    return RequestHead(
        method=method, target=origin_form(target), version=version, headers=headers, raw_names=raw_names,
        length=length, chunked=chunked, expect_continue=version == b"1.1" and b"100-continue" in expect,
        keep_alive=not _connection_close(headers, version),
    )


def check_response(head: bytes) -> ResponseHead:
    """A complete response head from the engine, checked whole."""
    status_line, *lines = _lines(head)
    m = _STATUS_LINE.fullmatch(status_line)
    if m is None:
        raise HeadError(f"malformed status line {status_line[:60]!r}")
    minor, code, reason = m.groups()
    version = b"1." + minor
    headers, _raw = _fields(lines)
    length, chunked = _framing(headers, version, "response")
    return ResponseHead(status=int(code), reason=reason or b"", version=version, headers=headers,
                        length=length, chunked=chunked, keep_alive=not _connection_close(headers, version))
