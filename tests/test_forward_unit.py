"""Fast tests of the forwarding core: routing, header rewriting, error shapes, the body relay."""

from __future__ import annotations

import gc
import json
import weakref
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from ccproxy.errors import ANTHROPIC, OPENAI, ApiError, error_body, sse_error_event
from ccproxy.forward import end_to_end, response_headers, upstream_headers
from ccproxy.http.budget import Budget
from ccproxy.routes import (
    BATCH_RESULTS,
    BATCHES,
    CHAT_COMPLETIONS,
    COMPLETE,
    COMPLETIONS,
    COUNT_TOKENS,
    MESSAGES,
    MODELS,
    OTHER,
    RESPONSE,
    RESPONSES,
    allowed_path,
    route,
)
from tests.support.forwarding import make_relay, upstreams

KEY = "sk-ant-api03-upstreamkeyupstreamkey-f3a9"


@pytest.mark.parametrize(("target", "api", "path", "kind"), [
    (b"/v1/messages", ANTHROPIC, b"/v1/messages", MESSAGES),
    (b"/v1/messages?beta=true", ANTHROPIC, b"/v1/messages?beta=true", MESSAGES),
    (b"/v1/messages/count_tokens?beta=true", ANTHROPIC, b"/v1/messages/count_tokens?beta=true", COUNT_TOKENS),
    (b"/v1/models", ANTHROPIC, b"/v1/models", MODELS),
    (b"/v1/models/claude-sonnet-4-6", ANTHROPIC, b"/v1/models/claude-sonnet-4-6", MODELS),
    (b"/v1/messages/batches", ANTHROPIC, b"/v1/messages/batches", BATCHES),
    (b"/v1/messages/batches/msgbatch_01/results", ANTHROPIC, b"/v1/messages/batches/msgbatch_01/results",
     BATCH_RESULTS),
    (b"/v1/complete", ANTHROPIC, b"/v1/complete", COMPLETE),
    (b"/openai/v1/chat/completions", OPENAI, b"/v1/chat/completions", CHAT_COMPLETIONS),
    (b"/openai/v1/completions", OPENAI, b"/v1/completions", COMPLETIONS),
    (b"/openai/v1/responses", OPENAI, b"/v1/responses", RESPONSES),
    (b"/openai/v1/responses/resp_123", OPENAI, b"/v1/responses/resp_123", RESPONSE),
    (b"/openai/v1/responses/resp_123/cancel", OPENAI, b"/v1/responses/resp_123/cancel", RESPONSE),
    (b"/openai/v1/models?x=1", OPENAI, b"/v1/models?x=1", MODELS),
])
def test_routes(target: bytes, api: str, path: bytes, kind: str) -> None:
    r = route(target, upstreams())
    assert (r.api, r.path, r.kind) == (api, path, kind)


@pytest.mark.parametrize("target", [
    b"/v1/messages/", b"/v1/messages;x=1", b"/v1/messages#frag", b"/v1/%6Dessages", b"/v1/messages%2F",
    b"/v1/Messages", b"/V1/messages", b"/openai/v1/Chat/completions", b"/openai/v1/chat/completions/",
    b"/v1/messages/count_tokens/", b"/v1/files", b"/openai/v1/embeddings", b"/v1/messages/batches/a;b",
])
def test_routes_fail_closed(target: bytes) -> None:
    # Never forwarded under a reading ccproxy's checks did not make: refused, not normalised.
    with pytest.raises(ApiError) as info:
        route(target, upstreams())
    assert info.value.status in (400, 404)


def test_routes_allowed_by_the_config_are_other() -> None:
    allow = [allowed_path("/v1/files"), allowed_path("/v1/files/*"), allowed_path("/openai/v1/embeddings")]
    assert route(b"/v1/files/file_01", upstreams(), allow).kind == OTHER
    assert route(b"/openai/v1/embeddings", upstreams(), allow).kind == OTHER
    with pytest.raises(ApiError):
        route(b"/v1/files/a/b", upstreams(), allow)


@pytest.mark.parametrize(("target", "status"), [
    (b"/", 404), (b"/v2/messages", 404), (b"/openai", 404), (b"/v1/./messages", 400), (b"/v1//messages", 400),
    (b"/v1/%2Fmessages", 400), (b"/openai/..%2fv1", 400), (b"/v1/a\\b", 400), (b"/v1/messages/..", 400),
])
def test_unroutable(target: bytes, status: int) -> None:
    with pytest.raises(ApiError) as info:
        route(target, upstreams())
    assert info.value.status == status


def client_headers(**extra: str) -> Headers:
    h = Headers({b"content-type": [b"application/json"], b"anthropic-version": [b"2023-06-01"],
                 b"anthropic-beta": [b"x,y"], b"x-api-key": [b"client-key"],
                 b"authorization": [b"Bearer client-token"], b"connection": [b"keep-alive, x-hop"],
                 b"x-hop": [b"1"], b"keep-alive": [b"300"], b"te": [b"trailers"], b"upgrade": [b"h2c"],
                 b"proxy-authorization": [b"Basic x"], b"host": [b"proxy.local"], b"content-length": [b"9"]})
    for k, v in extra.items():
        h.setRawHeaders(k.encode(), [v.encode()])
    return h


def test_upstream_headers_swap_credentials_and_drop_hop_by_hop() -> None:
    ups = upstreams(api_key=KEY)
    out = Headers(dict(upstream_headers(client_headers(), ups.anthropic, ANTHROPIC)))
    names = {k.lower() for k, _ in out.getAllRawHeaders()}
    assert names == {b"content-type", b"anthropic-version", b"anthropic-beta", b"x-api-key", b"host"}
    assert out.getRawHeaders(b"x-api-key") == [KEY.encode()]
    assert out.getRawHeaders(b"host") == [b"a.example:8443"]
    openai_out = Headers(dict(upstream_headers(client_headers(), ups.openai, OPENAI)))
    assert openai_out.getRawHeaders(b"authorization") == [b"Bearer sk-proj-openaiopenaiopenai-0000"]
    assert not openai_out.hasHeader(b"x-api-key")


def test_upstream_headers_pass_client_credentials_without_key() -> None:
    out = Headers(dict(upstream_headers(client_headers(), upstreams().anthropic, ANTHROPIC)))
    assert out.getRawHeaders(b"x-api-key") == [b"client-key"]
    assert out.getRawHeaders(b"authorization") == [b"Bearer client-token"]
    assert not out.hasHeader(b"x-hop")


def test_response_end_to_end_headers() -> None:
    h = Headers({b"request-id": [b"req_1"], b"transfer-encoding": [b"chunked"], b"content-length": [b"5"],
                 b"retry-after": [b"3"], b"connection": [b"close"], b"set-cookie": [b"a=b"]})
    assert dict(end_to_end(h)) == {b"Request-Id": [b"req_1"], b"Retry-After": [b"3"], b"Set-Cookie": [b"a=b"]}


def test_response_headers_strip_in_place_and_keep_the_length_only_when_asked() -> None:
    def upstream() -> Headers:
        return Headers({b"request-id": [b"req_1"], b"content-length": [b"5"], b"connection": [b"keep-alive, x-hop"],
                        b"x-hop": [b"1"], b"keep-alive": [b"timeout=5"], b"set-cookie": [b"a=b", b"c=d"]})

    kept = upstream()
    assert response_headers(kept, keep_length=True) is kept
    assert dict(kept.getAllRawHeaders()) == {b"Request-Id": [b"req_1"], b"Content-Length": [b"5"],
                                             b"Set-Cookie": [b"a=b", b"c=d"]}
    assert not response_headers(upstream(), keep_length=False).hasHeader(b"content-length")


def test_error_shapes() -> None:
    err = ApiError(429, "slow down", headers={"retry-after": "3"})
    assert json.loads(error_body(ANTHROPIC, err)) == {
        "type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    assert json.loads(error_body(OPENAI, err)) == {
        "error": {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    assert json.loads(error_body(ANTHROPIC, ApiError(529, "busy")))["error"]["type"] == "overloaded_error"
    assert json.loads(error_body(ANTHROPIC, ApiError(400, "x", type="custom_error")))["error"]["type"] == "custom_error"
    event = sse_error_event(ANTHROPIC, ApiError(502, "cut"))
    assert event.startswith(b"event: error\ndata: {") and event.endswith(b"}\n\n")
    assert sse_error_event(OPENAI, ApiError(502, "cut")).startswith(b"data: {\"error\"")


class Upper:
    """A body filter that holds back the last byte until the end, to show tails are handled."""

    def __init__(self) -> None:
        self.held = b""

    def feed(self, data: bytes) -> bytes:
        data = self.held + data
        self.held = data[-1:]
        return data[:-1].upper()

    def close(self) -> bytes:
        return self.held.upper()


def test_relay_streams_and_finishes() -> None:
    relay, request, heads, producer = make_relay(Clock(), sse=True)
    assert heads == [None]  # head written at once: nothing buffered
    assert request.producer is producer  # back-pressure: the client's channel can pause the upstream
    relay.dataReceived(b"event: a\n")
    relay.dataReceived(b"data: {}\n\n")
    assert request.written == [b"event: a\n", b"data: {}\n\n"]
    relay.connectionLost(Failure(ResponseDone()))
    assert request.finished and relay.done.called


def test_a_finished_relay_is_freed_by_reference_counting() -> None:
    # Its idle timer calls back into it: kept after the end, the two would form a cycle holding the
    # relay, its request and its context until the garbage collector ran (a cost on every request).
    gc.disable()
    try:
        for sse in (True, False):
            relay, request, _, _ = make_relay(Clock(), sse=sse)
            relay.dataReceived(b"data: {}\n\n")
            relay.connectionLost(Failure(ResponseDone()))
            assert request.finished
            gone = weakref.ref(relay)
            del relay
            assert gone() is None
    finally:
        gc.enable()


def test_relay_idle_timeout_ends_stream_with_error_event() -> None:
    clock = Clock()
    relay, request, _, producer = make_relay(clock, sse=True)
    relay.dataReceived(b"event: ping\ndata: {}\n\n")
    clock.advance(4)
    relay.dataReceived(b"event: ping\ndata: {}\n\n")
    clock.advance(4)
    assert not producer.stopped  # data resets the idle timer
    clock.advance(1.5)
    assert producer.stopped
    relay.connectionLost(Failure(ResponseFailed([Failure(Exception("aborted"))])))
    last = json.loads(request.written[-1].split(b"data: ", 1)[1])
    assert last["error"]["type"] == "timeout_error"
    assert request.finished


def test_relay_cut_never_flushes_held_tail() -> None:
    relay, request, _, _ = make_relay(Clock(), sse=True, body_filter=Upper())
    relay.dataReceived(b"abc")
    relay.connectionLost(Failure(ResponseFailed([Failure(Exception("cut"))])))
    assert request.written[0] == b"AB"
    assert b"C" not in b"".join(request.written)
    assert b"api_error" in request.written[-1]


def test_relay_cut_mid_body_aborts_the_client_rather_than_finishing() -> None:
    relay, request, _, _ = make_relay(Clock(), sse=False)
    relay.dataReceived(b'{"partial":')
    relay.connectionLost(Failure(ResponseFailed([Failure(Exception("cut"))])))
    assert request.written == [b'{"partial":']
    assert request.aborted and not request.finished  # a truncated body must not look complete
    assert relay.done.called


def test_relay_buffered_filter_writes_head_with_new_length() -> None:
    relay, request, heads, _ = make_relay(Clock(), sse=False, body_filter=Upper(), buffered=True)
    assert heads == []
    relay.dataReceived(b"hello ")
    relay.dataReceived(b"world")
    relay.connectionLost(Failure(ResponseDone()))
    assert heads == [11]
    assert b"".join(request.written) == b"HELLO WORLD"


def test_relay_cancel_stops_upstream() -> None:
    relay, request, _, producer = make_relay(Clock(), sse=True)
    relay.done.cancel()
    assert producer.stopped
    relay.connectionLost(Failure(ResponseFailed([Failure(Exception("aborted"))])))
    assert request.written == []
    relay.done.addErrback(lambda f: None)


def test_relay_holds_a_buffered_body_against_the_budget_and_gives_it_back() -> None:
    budget = Budget(lambda: 10)
    relay, _, heads, _ = make_relay(Clock(), sse=False, body_filter=Upper(), buffered=True, budget=budget)
    relay.dataReceived(b"hello ")
    assert budget.used == 6
    relay.dataReceived(b"world")  # 11 bytes would pass the budget of 10
    assert budget.used == 0 and heads == []
    failures: list[Any] = []
    relay.done.addErrback(failures.append)
    [failure] = failures
    assert failure.value.status == 503 and failure.value.headers == {"retry-after": "1"}
    again, _, heads, _ = make_relay(Clock(), sse=False, body_filter=Upper(), buffered=True, budget=budget)
    again.dataReceived(b"fits")
    again.connectionLost(Failure(ResponseDone()))
    assert heads == [4] and budget.used == 0
