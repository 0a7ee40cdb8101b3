"""Reading JSON with a decoder made once.

`json.loads` with any hook builds a new JSONDecoder (and its scanner) on every call; the content
checks read two documents per request with fixed hooks, so each keeps its decoder and reads
through it here, with json.loads's own handling of bytes (UTF-8, -16 or -32, as detected) and of
a leading byte-order mark in text.
"""

from __future__ import annotations

import json
from typing import Any


def loads(decoder: json.JSONDecoder, data: bytes | bytearray | str) -> Any:
    """`json.loads(data, <decoder's hooks>)`, without building a decoder."""
    if isinstance(data, str):
        if data.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
    else:
        data = data.decode(json.detect_encoding(data), "surrogatepass")
    return decoder.decode(data)
