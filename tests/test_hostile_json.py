"""JSON nested deeper than Python's recursion limit, from a client or an upstream: a clear answer, never a crash."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from ccproxy.content.layer import JsonFilter
from ccproxy.content.masking import Masker, built_in_rules, mask_strings, rule_set
from ccproxy.context import RequestContext
from ccproxy.errors import ANTHROPIC, ApiError
from tests.support.forwarding import make_relay, upstreams

SECRET = "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv_-0123"


def nested(depth: int, leaf: str) -> str:
    return "[" * depth + json.dumps(leaf) + "]" * depth


def masker() -> Masker:
    return Masker(rule_set(built_in_rules(True, True, True)), None)


def test_request_nested_too_deep_is_400() -> None:
    from ccproxy.routes import route

    ctx = RequestContext(request=None, request_id="r", route=route(b"/v1/messages", upstreams()),  # type: ignore[arg-type]
                         client_ip="127.0.0.1", started=0.0, body=nested(100_000, "x").encode())
    with pytest.raises(ApiError) as info:
        ctx.json()
    assert info.value.status == 400 and "too deeply" in info.value.message


def test_mask_strings_walks_any_depth() -> None:
    value: Any = json.loads(nested(900, SECRET))  # deeper than a recursive walk can go under the layers' frames
    counts: Counter[str] = Counter()
    masked = mask_strings({"a": value}, masker(), counts)
    assert SECRET not in json.dumps(masked)
    assert counts["anthropic_api_key"] == 1


@pytest.mark.parametrize("depth", [900, 100_000])
def test_json_response_too_deep_to_walk_is_masked_as_text(depth: int) -> None:
    reported: list[Counter[str]] = []
    body = ('{"type":"message","content":[{"type":"tool_use","id":"t","name":"n","input":{"a":'
            + nested(depth, SECRET) + "}}]}").encode()
    f = JsonFilter(masker(), ANTHROPIC, reported.append)
    out = f.feed(body) + f.close()
    assert SECRET.encode() not in out
    assert reported and reported[-1]["anthropic_api_key"] == 1


class Exploding:
    buffered = False

    def __init__(self, after: int) -> None:
        self.after = after

    def feed(self, data: bytes) -> bytes:
        self.after -= 1
        if self.after < 0:
            raise RuntimeError("filter bug")
        return data

    def close(self) -> bytes:
        raise RuntimeError("filter bug at the end")


def test_a_failing_filter_cuts_the_stream_with_an_error_event() -> None:
    relay, request, _, producer = make_relay(Clock(), sse=True, body_filter=Exploding(after=1))
    relay.dataReceived(b"event: a\ndata: {}\n\n")
    relay.dataReceived(b"event: b\ndata: {\"secret\":1}\n\n")
    assert b"secret" not in b"".join(request.written)
    assert b"api_error" in request.written[-1] and request.finished
    assert producer.stopped
    relay.connectionLost(Failure(ResponseDone()))  # nothing more happens after the cut


def test_a_failing_buffered_filter_becomes_a_502() -> None:
    class Buffered(Exploding):
        buffered = True

    relay, request, heads, _ = make_relay(Clock(), sse=False, body_filter=Buffered(after=5), buffered=True)
    relay.dataReceived(b'{"x":1}')
    relay.connectionLost(Failure(ResponseDone()))
    failures: list[Failure] = []
    relay.done.addErrback(failures.append)
    assert heads == [] and request.written == []
    assert failures and failures[0].value.status == 502  # resource.py answers it in the API's shape


_ENCODINGS = [b'{"a":[1,2.5,"\\u00e9"]}', '{"a":"\u00e9"}'.encode("utf-16"), '{"a":1}'.encode("utf-32-le"),
              b"\xef\xbb\xbf{}", "\ufeff{}", '{"a":1}', b"", b"{bad", b"\xff\xfe\x00", b'"\xed\xa0\x80"']


@pytest.mark.parametrize("data", _ENCODINGS)
def test_the_reused_decoders_read_what_json_loads_reads(data: bytes | str) -> None:
    # The content checks keep one decoder each instead of json.loads building one per call: same
    # text handling (bytes in any UTF, a byte-order mark refused in text), same result or error.
    from ccproxy.content import replies, validation

    def read(f: Any) -> tuple[str, Any]:
        try:
            return "ok", f(data)
        except Exception as e:
            return type(e).__name__, str(e)

    assert read(replies.strict_loads) == read(
        lambda d: json.loads(d, object_pairs_hook=replies._pairs, parse_constant=replies._constant))
    if not isinstance(data, str):
        same = read(lambda d: json.loads(d, object_pairs_hook=validation._pairs, parse_constant=validation._constant,
                                         parse_float=validation._float, parse_int=validation._int))
        ours = read(validation.strict_request)
        # strict_request names its refusals itself; what it accepts must be json.loads's reading.
        assert ours == same or (ours[0] == "Refusal" and same[0] != "ok")
