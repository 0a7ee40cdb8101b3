"""A strict reading of an HTTP/1.1 request head, before twisted.web parses it.

Anything two parsers could read differently (the root of request smuggling) is refused here with
a reason, so it never reaches twisted.web, the policy layers or the upstream.
"""

from __future__ import annotations

import re

import attrs

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# A request target in origin form: visible ASCII only, no space, no control byte.
_TARGET = re.compile(rb"^/[\x21-\x7e]*$")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
# A CR not followed by LF (a CR at the very end may still get its LF), or an LF without its CR.
_BARE = re.compile(rb"\r[^\n]|(?<!\r)\n")


class Malformed(Exception):
    """A request head refused with 400; `reason` is a short machine-readable name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@attrs.frozen
class Head:
    method: bytes
    target: bytes
    version: bytes
    content_length: int | None
    chunked: bool

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


def head_end(buffer: bytes | bytearray, limit: int) -> int:
    """Index of the blank line ending the head in `buffer`, -1 if not there yet, -2 if it cannot fit.

    The head's size is the request line and header lines with their line endings; the blank line
    that ends it is not counted.
    """
    end = buffer.find(b"\r\n\r\n", 0, limit + 2)
    if end >= 0:
        return end
    return -2 if len(buffer) >= limit + 2 else -1


def has_bare_line_break(partial: bytes | bytearray) -> bool:
    return _BARE.search(partial) is not None


def parse_head(head: bytes) -> Head:
    """Check a request head (without its final CRLF CRLF); raises Malformed."""
    stripped = head.replace(b"\r\n", b"")
    if b"\r" in stripped or b"\n" in stripped:
        raise Malformed("bare_cr_or_lf", "request head has a bare CR or LF")
    lines = head.split(b"\r\n")
    method, target, version = _request_line(lines[0])
    lengths: list[bytes] = []
    codings: list[bytes] = []
    hosts = 0
    for line in lines[1:]:
        name, value = _header(line)
        lower = name.lower()
        if lower == b"content-length":
            lengths.append(value)
        elif lower == b"transfer-encoding":
            codings.append(value)
        elif lower == b"host":
            hosts += 1
    if version == b"HTTP/1.1" and hosts != 1:
        raise Malformed("host_header", "an HTTP/1.1 request needs exactly one Host header")
    return Head(method, target, version, _content_length(lengths, codings), _chunked(codings, lengths, version))


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
