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
# A whole header block of valid lines (a value: visible ASCII, obs-text, SP, HTAB),
# and the split of a valid one into names and values.
_FIELD_BLOCK = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
_FIELD = re.compile(rb"([^:]+):[ \t]*(.*?)[ \t]*\r\n")
# The names whose values framing and routing depend on.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"host", b"expect"})
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


def _split(head: bytes) -> tuple[bytes, bytes]:
    """The first line of a complete head and its header block (each line
    with its CRLF; the empty line left out)."""
    first = head.find(b"\r\n")
    return head[:first], head[first + 2:-2]


def _fields(block: bytes) -> tuple[list[tuple[bytes, bytes]], dict[bytes, list[bytes]]]:
    """(lower-case name, value) of each header line, and the values of the
    names that framing depends on. The whole block is checked in one C-speed
    match; line by line only to say what is wrong."""
    if _FIELD_BLOCK.fullmatch(block) is None:
        _refuse_line(block)
    headers = [(name.lower(), value) for name, value in _FIELD.findall(block)]
    special: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        if name in _FRAMING:
            special.setdefault(name, []).append(value)
    return headers, special


def _refuse_line(block: bytes) -> None:
    for line in block[:-2].split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            raise HeadError("a header line is folded onto the one before (obs-fold)")
        m = _HEADER_LINE.fullmatch(line)
        if m is None:
            raise HeadError(f"malformed header line {line[:40]!r}")
        if _BAD_VALUE_BYTE.search(m.group(2)):
            raise HeadError(f"a control byte in the value of {m.group(1)[:40].decode()!r}")
    raise HeadError("malformed header block")  # not reached: some line fails above


def _framing(special: dict[bytes, list[bytes]], version: bytes, what: str) -> tuple[int | None, bool]:
    """(Content-Length, chunked) of a head, refusing every ambiguous framing."""
    lengths = special.get(b"content-length")
    encodings = special.get(b"transfer-encoding")
    if lengths and encodings:
        raise HeadError(f"the {what} has both Content-Length and Transfer-Encoding")
    if encodings:
        if version != b"1.1":
            raise HeadError(f"Transfer-Encoding in an HTTP/{version.decode()} {what}")
        codings = [c for c in (c.strip().lower() for v in encodings for c in v.split(b",")) if c]
        if not codings or codings[-1] != b"chunked":
            raise HeadError(f"the {what}'s Transfer-Encoding does not end with chunked")
        if codings.count(b"chunked") > 1:
            raise HeadError(f"the {what} is chunked more than once")
        if len(codings) > 1:
            raise HeadError("Only Transfer-Encoding: chunked is supported", 501)
        return None, True
    if not lengths:
        return None, False
    if len(lengths) > 1:
        raise HeadError(f"the {what} has more than one Content-Length")
    value = lengths[0]
    if not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
        raise HeadError(f"the {what}'s Content-Length is not a number: {value[:40]!r}")
    return int(value), False


def _connection_close(special: dict[bytes, list[bytes]], version: bytes) -> bool:
    values = special.get(b"connection")
    if not values:
        return version == b"1.0"
    tokens = {t.strip().lower() for v in values for t in v.split(b",")}
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
    request_line, block = _split(head)
    method, target, version = _request_line(request_line)
    headers, special = _fields(block)
    if version == b"1.1" and len(special.get(b"host", ())) != 1:
        raise HeadError("an HTTP/1.1 request needs exactly one Host header")
    length, chunked = _framing(special, version, "request")
    expect = special.get(b"expect")
    return RequestHead(
        method=method, target=origin_form(target), version=version, headers=headers, length=length,
        chunked=chunked, keep_alive=not _connection_close(special, version),
        expect_continue=bool(expect) and version == b"1.1"
        and any(v.strip().lower() == b"100-continue" for v in expect or ()),
    )


def check_response(head: bytes) -> ResponseHead:
    """A complete response head from the engine, checked whole."""
    status_line, block = _split(head)
    m = _STATUS_LINE.fullmatch(status_line)
    if m is None:
        raise HeadError(f"malformed status line {status_line[:60]!r}")
    minor, code, reason = m.groups()
    version = b"1." + minor
    headers, special = _fields(block)
    length, chunked = _framing(special, version, "response")
    return ResponseHead(status=int(code), reason=reason or b"", version=version, headers=headers,
                        length=length, chunked=chunked, keep_alive=not _connection_close(special, version))
