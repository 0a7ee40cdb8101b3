"""A strict reading of HTTP/1.1 heads in both directions, and of chunked bodies.

Anything two parsers could read differently (the root of request smuggling and response splitting)
is refused here with a reason: a request head before it reaches the policy layers or the upstream,
an upstream's response head before any of it reaches the client. Both directions share the rules
for header names, values and framing.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# A request target in origin form: visible ASCII only, no space, no control byte.
_TARGET = re.compile(rb"^/[\x21-\x7e]*$")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
# A CR not followed by LF (a CR at the very end may still get its LF), or an LF without its CR.
_BARE = re.compile(rb"\r[^\n]|(?<!\r)\n")


class Malformed(Exception):
    """A head refused (a request with 400, an upstream response with 502); `reason` is a short
    machine-readable name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class TooLarge(Exception):
    """A chunked body whose declared chunk sizes pass the limit (answered 413)."""


class Head(NamedTuple):
    method: bytes
    target: bytes
    version: bytes
    content_length: int | None
    chunked: bool
    headers: tuple[tuple[bytes, bytes], ...] = ()
    # Whether the connection may carry another request after this one.
    persistent: bool = True
    expect_continue: bool = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class HeadScan:
    """Finds the end of a request head in a growing buffer, looking at each byte a bounded number of times.

    A head trickled a byte per read must not cost a scan of the whole buffer per read: `find`
    resumes where the previous call stopped (three bytes back, so a CRLF CRLF split across reads
    is still seen), and `examined` counts the bytes looked at, for tests and benches.
    """

    __slots__ = ("examined", "limit", "offset")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # How much of the buffer is known to hold no end of head and no bare CR or LF.
        self.offset = 0
        self.examined = 0

    def find(self, buffer: bytes | bytearray) -> int:
        """Index of the blank line ending the head, -1 if not there yet, -2 if it cannot fit.

        The head's size is the request line and header lines with their line endings; the blank
        line that ends it is not counted. A bare CR or LF before the end raises Malformed: without
        this a head ended by bare LFs would wait for the deadline, never complete.
        """
        size = len(buffer)
        stop = min(size, self.limit + 2)
        start = max(0, self.offset - 3)
        end = buffer.find(b"\r\n\r\n", start, stop)
        self.examined += max(0, (end + 4 if end >= 0 else stop) - start)
        if end >= 0:
            return end
        if size >= self.limit + 2:
            return -2
        # One byte back: a CR that ended the last read may now be followed by something else.
        start = max(0, self.offset - 1)
        self.examined += size - start
        if _BARE.search(buffer, start) is not None:
            raise Malformed("bare_cr_or_lf", "request head has a bare CR or LF")
        self.offset = size
        return -1

    def forget(self, removed: int) -> None:
        """`removed` bytes were taken off the front of the buffer."""
        self.offset = max(0, self.offset - removed)


# A well-formed head in one match: the request line, then header lines with token names and values
# free of control bytes. Most requests are read by this alone; any other head is read line by line
# below, which names the fault.
_TOKEN_CHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_WELL_FORMED = re.compile(
    rb"(" + _TOKEN_CHARS + rb"+) (/[\x21-\x7e]*) (HTTP/1\.[01])\r\n"
    rb"((?:" + _TOKEN_CHARS + rb"+:[\t\x20-\x7e\x80-\xff]*\r\n)*)"
)
_SPECIAL = frozenset({b"content-length", b"transfer-encoding", b"host", b"connection", b"expect"})
_SPECIAL_LENGTHS = frozenset(len(name) for name in _SPECIAL)


def parse_head(head: bytes) -> Head:
    """Check a request head (without its final CRLF CRLF); raises Malformed."""
    match = _WELL_FORMED.fullmatch(head + b"\r\n")
    if match is None:
        return _parse_head_by_line(head)
    method, target, version, fields = match.groups()
    headers, special = _fields(fields, _SPECIAL, _SPECIAL_LENGTHS)
    return _head(method, target, version, headers, special)


def _fields(fields: bytes, wanted: frozenset[bytes], lengths: frozenset[int],
            ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """The (name, value) pairs of field lines the head regex has already checked, and those of them
    named in `wanted` (lower case; `lengths` their lengths, which spare most names a lower-casing)."""
    headers = []
    picked = []
    for line in fields.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        value = value.strip(b" \t")
        headers.append((name, value))
        if len(name) in lengths and name.lower() in wanted:
            picked.append((name, value))
    return headers, picked


def _parse_head_by_line(head: bytes) -> Head:
    stripped = head.replace(b"\r\n", b"")
    if b"\r" in stripped or b"\n" in stripped:
        raise Malformed("bare_cr_or_lf", "request head has a bare CR or LF")
    lines = head.split(b"\r\n")
    method, target, version = _request_line(lines[0])
    headers = [_header(line) for line in lines[1:]]
    return _head(method, target, version, headers, headers)


def _head(method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]],
          special: list[tuple[bytes, bytes]]) -> Head:
    """The Head of checked lines; `special` holds at least the headers that frame the message."""
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    hosts = 0
    expect = False
    for name, value in special:
        lower = name.lower()
        if lower == b"content-length":
            lengths.append(value)
        elif lower == b"transfer-encoding":
            codings.append(value)
        elif lower == b"host":
            hosts += 1
        elif lower == b"connection":
            connection.append(value.lower())
        elif lower == b"expect":
            expect = value.lower() == b"100-continue"
    if version == b"HTTP/1.1" and hosts != 1:
        raise Malformed("host_header", "an HTTP/1.1 request needs exactly one Host header")
    chunked = _chunked(codings, lengths, version)
    length = _content_length(lengths, codings)
    # HTTP/1.0 keep-alive is not offered: one request per HTTP/1.0 connection.
    persistent = version == b"HTTP/1.1" and not any(b"close" in _tokens(v) for v in connection)
    return Head(method, target, version, length, chunked, tuple(headers), persistent,
                expect and version == b"HTTP/1.1" and (chunked or bool(length)))


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip() for token in value.split(b",")]


def _request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise Malformed("request_line", "request line must be METHOD SP TARGET SP VERSION")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise Malformed("request_line", "invalid method")
    if not _TARGET.match(target):
        raise Malformed("request_target", "request target must be an absolute path of visible ASCII")
    if version not in _VERSIONS:
        raise Malformed("http_version", "only HTTP/1.1 and HTTP/1.0 are served")
    return method, target, version


def _header(line: bytes) -> tuple[bytes, bytes]:
    if line[:1] in (b" ", b"\t"):
        raise Malformed("obs_fold", "folded header lines are not accepted")
    name, sep, value = line.partition(b":")
    if not sep or not _TOKEN.match(name):
        raise Malformed("header_name", "invalid header line")
    value = value.strip(b" \t")
    if _BAD_VALUE.search(value):
        raise Malformed("header_value", "header value holds a control character")
    return name, value


def _content_length(lengths: list[bytes], codings: list[bytes]) -> int | None:
    if not lengths:
        return None
    if codings:
        raise Malformed("cl_and_te", "Content-Length and Transfer-Encoding together")
    if len(lengths) > 1:
        raise Malformed("repeated_content_length", "Content-Length given more than once")
    value = lengths[0]
    if not value.isdigit() or len(value) > 19:
        raise Malformed("content_length", "Content-Length is not a plain decimal number")
    return int(value)


def _chunked(codings: list[bytes], lengths: list[bytes], version: bytes) -> bool:
    if not codings:
        return False
    if version != b"HTTP/1.1":
        raise Malformed("transfer_encoding", "Transfer-Encoding needs HTTP/1.1")
    if len(codings) > 1 or codings[0].lower() != b"chunked":
        raise Malformed("transfer_encoding", "the only transfer coding accepted is a single 'chunked'")
    return True


# A chunk-size line (size and extensions) longer than this is refused.
MAX_CHUNK_LINE = 1024
# All trailer lines of a chunked body together.
MAX_TRAILERS = 8192
_HEX = frozenset(b"0123456789abcdefABCDEF")
_BAD_EXTENSION = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
SIZE, DATA, DATA_CR, DATA_LF, TRAILER, DONE = range(6)
_PLAIN_SIZE = re.compile(rb"([0-9a-fA-F]{1,16})\r\n")


class ChunkedDecoder:
    """Decodes a chunked body as it arrives (RFC 9112 section 7.1), strictly, in linear time.

    `feed_into` appends the body bytes found to one bytearray (no object per chunk, so 2-byte
    chunks cost what their bytes do) and says how much of its input it used: once `done`, the rest
    is the start of the next message. Each input byte is looked at a bounded number of times (a
    line split across reads is kept, never searched again); `examined` counts them. Raises
    Malformed on a fault, and TooLarge as soon as the declared chunk sizes pass `limit`, before that
    chunk's data is read.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.declared = 0
        self.state = SIZE
        self.remaining = 0
        self.trailer_bytes = 0
        # A size or trailer line whose end has not arrived yet.
        self.line = bytearray()
        self.rest = b""
        self.examined = 0

    @property
    def done(self) -> bool:
        return self.state == DONE

    def feed(self, data: bytes) -> list[bytes]:
        """The body bytes in `data` (at most one piece); `rest` holds what follows the body."""
        out = bytearray()
        used = self.feed_into(data, out)
        if self.state == DONE:
            self.rest = data[used:]
        return [bytes(out)] if out else []

    def feed_into(self, data: bytes | bytearray, out: bytearray) -> int:
        """Append the body bytes of `data` to `out`; return how many bytes of `data` were used."""
        pos = 0
        size = len(data)
        with memoryview(data) as view:
            while pos < size and self.state != DONE:
                state = self.state
                if state == DATA:
                    take = min(self.remaining, size - pos)
                    out += view[pos : pos + take]
                    pos += take
                    self.remaining -= take
                    if not self.remaining:
                        self.state = DATA_CR
                elif state == DATA_CR and data.startswith(b"\r\n", pos):
                    self.examined += 2
                    pos += 2
                    self.state = SIZE
                elif state == DATA_CR or state == DATA_LF:
                    self.examined += 1
                    if data[pos] != (13 if state == DATA_CR else 10):
                        raise Malformed("chunk_framing", "chunk data not followed by CRLF")
                    pos += 1
                    self.state = DATA_LF if state == DATA_CR else SIZE
                elif state == SIZE and not self.line and (plain := _PLAIN_SIZE.match(data, pos)) is not None:
                    # The usual size line, read in one step; anything else goes the long way.
                    self.examined += plain.end() - pos
                    self._sized(int(plain.group(1), 16))
                    pos = plain.end()
                else:
                    pos = self._line(data, pos, size)
        return pos

    def _line(self, data: bytes | bytearray, pos: int, size: int) -> int:
        """Read (part of) a size or trailer line from `pos`; return the position after what was read."""
        limit = MAX_CHUNK_LINE if self.state == SIZE else MAX_TRAILERS - self.trailer_bytes
        # Never search further than the longest line allowed could reach.
        stop = min(size, pos + limit + 2 - len(self.line))
        lf = data.find(b"\n", pos, stop)
        self.examined += (lf + 1 if lf >= 0 else stop) - pos
        if lf < 0:
            piece = data[pos:stop]
            if b"\r" in piece[:-1] or (self.line[-1:] == b"\r" and piece):
                raise Malformed("bare_cr_or_lf", "chunked body has a bare CR or LF")
            self.line += piece
            if len(self.line) > limit:
                raise Malformed("chunk_framing", "chunk-size or trailer line too long")
            return stop
        self.line += memoryview(data)[pos:lf]
        line = bytes(self.line)
        self.line.clear()
        if not line.endswith(b"\r"):
            raise Malformed("bare_cr_or_lf", "chunked body has a bare CR or LF")
        line = line[:-1]
        if self.state == SIZE:
            self._size_line(line)
        else:
            self._trailer_line(line)
        return lf + 1

    def _size_line(self, line: bytes) -> None:
        if len(line) > MAX_CHUNK_LINE or b"\n" in line or b"\r" in line:
            raise Malformed("chunk_framing", "malformed chunk-size line")
        size, _, extension = line.partition(b";")
        size = size.rstrip(b" \t")
        if not size or not _HEX.issuperset(size):
            raise Malformed("chunk_size", "chunk size is not a hexadecimal number")
        if len(size.lstrip(b"0")) > 16:
            raise TooLarge()
        if _BAD_EXTENSION.search(extension):
            raise Malformed("chunk_extension", "chunk extension holds a control character")
        self._sized(int(size, 16))

    def _sized(self, size: int) -> None:
        self.remaining = size
        self.declared += size
        if self.declared > self.limit:
            raise TooLarge()
        self.state = DATA if size else TRAILER

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            self.state = DONE
            return
        self.trailer_bytes += len(line) + 2
        if self.trailer_bytes > MAX_TRAILERS or b"\n" in line or b"\r" in line:
            raise Malformed("chunk_trailer", "chunked body trailers too large or malformed")
        _header(line)  # trailers are read and dropped, but must be well-formed


# -- response heads (the upstream's answers), read with the same rules as request heads

# The informational responses an upstream may send before the real one; more is a broken upstream.
MAX_INFORMATIONAL = 8
_REASON = rb"[\t\x20-\x7e\x80-\xff]*"
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([1-5][0-9][0-9])(?: (" + _REASON + rb"))?")
_WELL_FORMED_RESPONSE = re.compile(
    rb"(HTTP/1\.[01]) ([1-5][0-9][0-9])(?: (" + _REASON + rb"))?\r\n"
    rb"((?:" + _TOKEN_CHARS + rb"+:[\t\x20-\x7e\x80-\xff]*\r\n)*)"
)
_NO_BODY_STATUS = frozenset({204, 304})
# How the end of a response body is found (RFC 9112 section 6.3).
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = "none", "length", "chunked", "close"


class ResponseHead(NamedTuple):
    version: bytes
    code: int
    phrase: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    framing: str
    # The body's length when `framing` is LENGTH, 0 for NO_BODY, None otherwise.
    length: int | None
    # Whether the connection may carry another request after this response.
    persistent: bool

    @property
    def informational(self) -> bool:
        return self.code < 200


def parse_response_head(head: bytes, method: bytes) -> ResponseHead:
    """Check a response head (without its final CRLF CRLF) to a request of `method`; raises Malformed."""
    match = _WELL_FORMED_RESPONSE.fullmatch(head + b"\r\n")
    if match is None:
        return _parse_response_head_by_line(head, method)
    version, code, phrase, fields = match.groups()
    headers, framing = _fields(fields, _FRAMING_NAMES, _FRAMING_NAME_LENGTHS)
    return _response_head(version, int(code), phrase or b"", tuple(headers), framing, method)


def _parse_response_head_by_line(head: bytes, method: bytes) -> ResponseHead:
    stripped = head.replace(b"\r\n", b"")
    if b"\r" in stripped or b"\n" in stripped:
        raise Malformed("bare_cr_or_lf", "response head has a bare CR or LF")
    lines = head.split(b"\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise Malformed("status_line", "status line must be HTTP/1.x SP 3DIGIT SP reason, reason free of controls")
    version, code, phrase = match.groups()
    headers = [_header(line) for line in lines[1:]]
    return _response_head(version, int(code), phrase or b"", tuple(headers), headers, method)


_FRAMING_NAMES = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_FRAMING_NAME_LENGTHS = frozenset(len(name) for name in _FRAMING_NAMES)


def _response_head(version: bytes, code: int, phrase: bytes, headers: tuple[tuple[bytes, bytes], ...],
                   framing: list[tuple[bytes, bytes]], method: bytes) -> ResponseHead:
    """The ResponseHead of checked lines; `framing` holds at least the headers that frame it."""
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    for name, value in framing:
        lower = name.lower()
        if lower == b"content-length":
            lengths.append(value)
        elif lower == b"transfer-encoding":
            codings.append(value)
        elif lower == b"connection":
            connection.extend(_tokens(value.lower()))
    if code == 101:
        # ccproxy never asks for an upgrade (Upgrade does not cross it): a 101 is a broken upstream.
        raise Malformed("unsolicited_upgrade", "101 Switching Protocols to a request that asked for no upgrade")
    if version == b"HTTP/1.1":
        persistent = b"close" not in connection
    else:
        persistent = b"keep-alive" in connection and b"close" not in connection
    if code < 200:
        return ResponseHead(version, code, phrase, headers, NO_BODY, 0, persistent)
    # The framing headers are checked even where they do not apply: an upstream sending a bad one
    # is broken, and a second parser on the way could read it differently.
    chunked = _chunked(codings, lengths, version)
    if chunked:
        # Both: a message built to be read two ways. Read as chunked, but never reuse the connection.
        length = None
        persistent = persistent and not lengths
    else:
        length = _content_length(lengths, codings)
    if method == b"HEAD" or code in _NO_BODY_STATUS:
        return ResponseHead(version, code, phrase, headers, NO_BODY, 0, persistent)
    if chunked:
        return ResponseHead(version, code, phrase, headers, CHUNKED, None, persistent)
    if length is not None:
        return ResponseHead(version, code, phrase, headers, LENGTH, length, persistent)
    return ResponseHead(version, code, phrase, headers, UNTIL_CLOSE, None, False)


# The bytes a written head may hold outside its line ends (HTAB, visible ASCII, obs-text).
_HEAD_BYTES = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))


def valid_written_head(head: bytes, lines: int) -> bool:
    """Whether a serialised head of `lines` lines (the blank one included) holds no control byte
    and no CR or LF but its line ends: no phrase, name or value can split it or hide a line."""
    return head.translate(None, _HEAD_BYTES) == b"\r\n" * lines


_VALID_REASON = re.compile(_REASON)


def valid_reason(phrase: bytes) -> bool:
    return _VALID_REASON.fullmatch(phrase) is not None


def valid_field(name: bytes, value: bytes) -> bool:
    return _TOKEN.match(name) is not None and _BAD_VALUE.search(value) is None
