"""ProxyRequest's public face: our own names, and no twisted.web look-alike creeping back."""

from __future__ import annotations

import inspect

from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from ccproxy.http.request import ProxyRequest, SendWatch
from tests.support.forwarding import FakeProducer
from tests.support.requests import RECORDING, FakeRequest
from tests.support.wire import FakeChannel

# Every public name of a ProxyRequest (its class docstring says what each is for). A name added,
# renamed or taken away changes this set on purpose.
DOCUMENTED = {
    # the request, as the client sent it
    "method", "target", "path", "request_headers", "started", "request_id", "ctx",
    "body_now", "read_body", "is_secure", "client_address", "peer_host",
    # the response
    "set_status", "status", "phrase", "set_header", "response_headers", "respond", "write", "finish",
    "head_sent", "finished", "when_finished", "abort",
    # IConsumer: how a producer (the upstream socket) is attached
    "registerProducer", "unregisterProducer",
    # called by the channel
    "body_arrived", "body_failed", "connection_lost",
}


def request(channel: FakeChannel | None = None) -> ProxyRequest:
    return ProxyRequest(channel or FakeChannel(), b"GET", b"/v1/models?limit=1", Headers(), 0.0, b"")


def test_proxy_request_has_exactly_its_documented_names() -> None:
    names = {name for name in dir(request()) if not name.startswith("_")}
    assert names == DOCUMENTED


def test_its_only_camel_case_names_are_twisteds_consumer_interface() -> None:
    made = request()
    camel = {name for name in dir(made) if not name.startswith("_") and name != name.lower()}
    assert camel == {"registerProducer", "unregisterProducer"}
    assert verifyObject(IConsumer, made)


def test_the_send_watch_is_a_push_producer() -> None:
    watch = SendWatch(FakeProducer(), FakeChannel())
    assert verifyObject(IPushProducer, watch)


def test_the_fake_request_answers_to_proxy_requests_names_and_signatures() -> None:
    """Tests that drive a layer or the relay with the fake exercise the names ProxyRequest has."""
    fake, real = FakeRequest(), request()
    shared = {name for name in dir(fake) if not name.startswith("_")} - RECORDING
    assert shared <= DOCUMENTED
    assert RECORDING.isdisjoint(DOCUMENTED)
    for name in shared:
        ours, theirs = getattr(fake, name), getattr(real, name)
        assert callable(ours) == callable(theirs), name
        if callable(ours):
            assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters), name


def test_abort_drops_the_client_connection_without_finishing() -> None:
    channel = FakeChannel()
    made = request(channel)
    made.write(b"part of a body")
    made.abort()
    assert channel.transport.disconnected and not made.finished
