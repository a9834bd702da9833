"""Passing a chunked body through, byte for byte, without decoding it.

The proxy relays an engine's chunked response to a client that also reads
chunked. It only needs to know where the body's last chunk begins, so that
it can end the client's body itself (and reuse both connections). Pure
logic: bytes in, bytes to forward out; no I/O, and in the common case (whole
chunks per read) no copy of the data.
"""

from __future__ import annotations

import re
from itertools import repeat

# A chunk-size line is a hex size and optional extensions; vLLM's are ~6 bytes.
MAX_SIZE_LINE_BYTES = 1024
MAX_TRAILER_BYTES = 16 * 1024
# The common size line: plain hex and CRLF ("1a3\r\n"), matched in place.
_PLAIN_SIZE_LINE = re.compile(rb"([0-9a-fA-F]{1,16})\r\n")


def _one_chunk(buf: bytes) -> int:
    """Where the data begins of a read that is exactly one whole chunk, with
    a plain hex size and some data; -1 for anything else. That is what an
    engine's stream reads as, one token's event a chunk, written on its own."""
    m = _PLAIN_SIZE_LINE.match(buf)
    if m is None:
        return -1
    start = m.end()
    size = int(m.group(1), 16)
    if size and start + size + 2 == len(buf) and buf.endswith(b"\r\n"):
        return start
    return -1


def chunk_data(buf: bytes) -> bytes | None:
    """The data of a read that is whole chunks only, none of them the last:
    one (as `_one_chunk` takes it), or several that a busy gateway read at
    once (as `_whole_chunks` takes them); None for anything else."""
    start = _one_chunk(buf)
    if start >= 0:
        return buf[start:-2]
    whole = _whole_chunks(buf)
    return None if whole is None or whole[1] >= 0 else b"".join(whole[0])


def whole_chunks_only(buf: bytes) -> bool:
    """Whether a read is whole chunks only, none of them the last: passed
    on as it is, it leaves a reader between chunks, as it found it."""
    if _one_chunk(buf) >= 0:
        return True
    whole = _whole_chunks(buf)
    return whole is not None and whole[1] < 0


# The sizes of a read's whole chunks, one per line, all plain hex.
_PLAIN_SIZES = re.compile(rb"[0-9a-fA-F]{1,16}(?:\n[0-9a-fA-F]{1,16})*")


def _whole_chunks(buf: bytes) -> tuple[list[bytes], int] | None:
    """The common read, checked at C speed: whole chunks with plain hex
    sizes and no CRLF inside their data, maybe ending with a bare last chunk
    (no trailers, nothing after it). Their data, and where the last chunk
    begins (-1: not in this read); None for anything else.

    Splitting at every CRLF gives size, data, size, data...; where each size
    equals the length of the data after it, no chunk's data held a CRLF, so
    the split is the parse. A walk chunk by chunk costs ~1 µs a chunk in
    Python, and an engine's stream is one chunk per token.
    """
    if not buf.endswith(b"\r\n"):
        return None
    parts = buf.split(b"\r\n")
    del parts[-1]  # what followed the last CRLF: nothing
    sizes, datas = parts[0::2], parts[1::2]
    if len(sizes) != len(datas) or _PLAIN_SIZES.fullmatch(b"\n".join(sizes)) is None:
        return None
    if list(map(int, sizes, repeat(16, len(sizes)))) != list(map(len, datas)):
        return None
    empty = datas.count(b"")  # a size 0: the last chunk
    if not empty:
        return datas, -1
    if empty > 1 or datas[-1]:
        return None
    del datas[-1]
    return datas, len(buf) - len(sizes[-1]) - 4


class ChunkedError(Exception):
    """The bytes are not valid chunked encoding."""


class ChunkedPassthrough:
    """Feed the raw body bytes as they arrive; `feed` returns the bytes to
    forward now. A size line split across reads is held back until it is
    whole. Once `done`, the last chunk and trailers were consumed (not
    returned) and `leftover` holds whatever followed them."""

    def __init__(self) -> None:
        self._data_left = 0  # chunk data still to pass
        self._crlf_left = 0  # bytes of the CRLF after the chunk data still due
        self._held = b""  # an incomplete size or trailer line
        self._in_trailers = False
        self.done = False
        self.leftover = b""

    @property
    def at_boundary(self) -> bool:
        """Whether everything forwarded so far ends between chunks (so that
        more chunks of our own may follow)."""
        return not (self._data_left or self._crlf_left)

    @property
    def idle(self) -> bool:
        """Between chunks, holding nothing: whole chunks may pass it by."""
        return not (self._data_left or self._crlf_left or self._held or self._in_trailers or self.done)

    def feed(self, data: bytes) -> bytes:
        if self.done:
            raise ChunkedError("data after the end of the body")
        buf = self._held + data if self._held else data
        self._held = b""
        if self._in_trailers:
            self._trailers(buf, 0)
            return b""
        if not (self._data_left or self._crlf_left):
            if _one_chunk(buf) >= 0:
                return buf
            whole = _whole_chunks(buf)
            if whole is not None:
                last = whole[1]
                if last < 0:
                    return buf
                self.done = True
                return buf[:last]
        pos = 0
        n = len(buf)
        plain = _PLAIN_SIZE_LINE.match
        while pos < n:
            if self._data_left:
                step = min(self._data_left, n - pos)
                self._data_left -= step
                pos += step
                continue
            if self._crlf_left:
                k = min(self._crlf_left, n - pos)
                want = b"\r\n"[2 - self._crlf_left:2 - self._crlf_left + k]
                if buf[pos:pos + k] != want:
                    raise ChunkedError("a chunk's data does not end with CRLF")
                self._crlf_left -= k
                pos += k
                continue
            m = plain(buf, pos)
            if m is not None:  # the common case: C-speed checks, no copies
                size = int(m.group(1), 16)
                start = m.end()
            else:
                end = buf.find(b"\n", pos)
                if end < 0:
                    if n - pos > MAX_SIZE_LINE_BYTES:
                        raise ChunkedError("a chunk-size line is too long")
                    self._held = buf[pos:]
                    return buf[:pos]
                size = _chunk_size(buf[pos:end + 1])
                start = end + 1
            if size == 0:
                self._in_trailers = True
                self._trailers(buf, start)
                return buf[:pos]
            nxt = start + size
            if nxt + 2 <= n:  # the whole chunk is here: skip it in one step
                if not buf.startswith(b"\r\n", nxt):
                    raise ChunkedError("a chunk's data does not end with CRLF")
                pos = nxt + 2
                continue
            self._data_left = size
            self._crlf_left = 2
            pos = start
        return buf

    def _trailers(self, buf: bytes, pos: int) -> None:
        """After the last chunk: trailer lines until an empty one."""
        n = len(buf)
        while pos < n:
            end = buf.find(b"\n", pos)
            if end < 0:
                if n - pos > MAX_TRAILER_BYTES:
                    raise ChunkedError("trailers are too long")
                self._held = buf[pos:]
                return
            line = buf[pos:end + 1]
            pos = end + 1
            if _trailer_line(line):
                self.done = True
                self.leftover = buf[pos:]
                return


# A chunk-size line as strictly as h11 reads it (RFC 9112 section 7.1): hex
# digits from the first byte, maybe extensions, CRLF; no bare LF or CR, no
# space before the size, no "0x" and no sign.
_SIZE_LINE = re.compile(rb"([0-9a-fA-F]{1,16})((?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?)[ \t]*\r\n")
# A trailer line: a header line, CRLF-terminated.
_TRAILER_LINE = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+:[\t\x20-\x7e\x80-\xff]*\r\n")


def _chunk_size(line: bytes) -> int:
    m = _SIZE_LINE.fullmatch(line)
    if m is None:
        raise ChunkedError(f"bad chunk-size line {line[:40]!r}")
    return int(m.group(1), 16)


def _trailer_line(line: bytes) -> bool:
    """Whether the line ends the trailers; raises for a malformed one."""
    if line == b"\r\n":
        return True
    if _TRAILER_LINE.fullmatch(line) is None:
        raise ChunkedError(f"bad trailer line {line[:40]!r}")
    return False


class ChunkedDecoder:
    """Decode a chunked body: feed raw bytes as they arrive, get the data
    they complete (chunk data as soon as it arrives, size lines and CRLFs
    removed). Once `done`, the last chunk and any trailers were consumed
    (trailers are dropped) and `leftover` holds what followed them. Bad
    framing after good data: the data comes out first, then `error` is set
    and the next `feed` raises it."""

    def __init__(self) -> None:
        self._data_left = 0
        self._crlf_left = 0
        self._held = b""
        self._in_trailers = False
        self.done = False
        self.leftover = b""
        self.error: str | None = None

    @property
    def idle(self) -> bool:
        """Between chunks, holding nothing: whole chunks may be decoded
        without it (`chunk_data`)."""
        return not (self._data_left or self._crlf_left or self._held or self._in_trailers or self.done
                    or self.error)

    def feed(self, data: bytes) -> bytes:
        if self.error:
            raise ChunkedError(self.error)
        if self.done:
            raise ChunkedError("data after the end of the body")
        buf = self._held + data if self._held else data
        self._held = b""
        if self._in_trailers:
            self._trailers(buf, 0)
            return b""
        if not (self._data_left or self._crlf_left):
            start = _one_chunk(buf)
            if start >= 0:
                return buf[start:-2]
            whole = _whole_chunks(buf)
            if whole is not None:
                datas, last = whole
                self.done = last >= 0
                return datas[0] if len(datas) == 1 else b"".join(datas)
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        plain = _PLAIN_SIZE_LINE.match
        while pos < n:
            if self._data_left:
                step = min(self._data_left, n - pos)
                out.append(buf[pos:pos + step])
                self._data_left -= step
                pos += step
                continue
            if self._crlf_left:
                k = min(self._crlf_left, n - pos)
                want = b"\r\n"[2 - self._crlf_left:2 - self._crlf_left + k]
                if buf[pos:pos + k] != want:
                    return self._fail(out, "a chunk's data does not end with CRLF")
                self._crlf_left -= k
                pos += k
                continue
            m = plain(buf, pos)
            if m is not None:
                size = int(m.group(1), 16)
                start = m.end()
            else:
                end = buf.find(b"\n", pos)
                if end < 0:
                    if n - pos > MAX_SIZE_LINE_BYTES:
                        raise ChunkedError("a chunk-size line is too long")
                    self._held = buf[pos:]
                    break
                try:
                    size = _chunk_size(buf[pos:end + 1])
                except ChunkedError as e:
                    return self._fail(out, str(e))
                start = end + 1
            if size == 0:
                self._in_trailers = True
                self._trailers(buf, start)
                break
            nxt = start + size
            if nxt + 2 <= n:  # the whole chunk is here
                out.append(buf[start:nxt])
                if not buf.startswith(b"\r\n", nxt):
                    return self._fail(out, "a chunk's data does not end with CRLF")
                pos = nxt + 2
                continue
            self._data_left = size
            self._crlf_left = 2
            pos = start
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def _fail(self, out: list[bytes], why: str) -> bytes:
        if not out:
            raise ChunkedError(why)
        self.error = why
        return b"".join(out)

    def _trailers(self, buf: bytes, pos: int) -> None:
        n = len(buf)
        while pos < n:
            end = buf.find(b"\n", pos)
            if end < 0:
                if n - pos > MAX_TRAILER_BYTES:
                    raise ChunkedError("trailers are too long")
                self._held = buf[pos:]
                return
            line = buf[pos:end + 1]
            pos = end + 1
            if _trailer_line(line):
                self.done = True
                self.leftover = buf[pos:]
                return
