"""The supervisor-owned limit store and the workers' batched questions, in memory."""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from ccproxy.blocklist import BlockList
from ccproxy.limits._core import Quota, Rate
from ccproxy.limits._memory import MemoryStore
from ccproxy.limits._plan import AutoBlockProbe
from ccproxy.limits._redis import RedisUnavailable
from ccproxy.workers.gate import ConnectionCounts, _Admission
from ccproxy.workers.state import SharedStore, StateOwner, decode, decode_charge, encode, encode_charge
from tests.support.limits import T0


def _limits() -> list[Any]:
    return [Rate("per_ip_minute", "m:1.2.3.4", 60, 60.0, 3), Quota("key_daily", "d:k1:20000", 5, T0 + 3600)]


def test_limits_cross_the_channel_unchanged() -> None:
    probe = AutoBlockProbe("1.2.3.4", Rate("auto_block", "a:10:1.2.3.4", 10, 60.0, 10), 300.0)
    now, ip, limits, back, budgets = decode(encode(T0 + 0.123456789, "1.2.3.4", _limits(), probe))
    assert (now, ip, limits, back, budgets) == (T0 + 0.123456789, "1.2.3.4", _limits(), probe, [])
    as_json = json.loads(json.dumps(encode(T0, "1.2.3.4", _limits(), probe, _budgets())))  # lists, not tuples
    assert decode(as_json) == (T0, "1.2.3.4", _limits(), probe, _budgets())


class _Wire:
    """Connects a SharedStore to a StateOwner as the control channel would, in the same process."""

    def __init__(self, owner: StateOwner, store: SharedStore) -> None:
        self.owner = owner
        self.store = store
        self.messages: list[dict[str, Any]] = []
        store.connect(self.send)

    def send(self, op: str, **fields: Any) -> None:
        # What the supervisor and the worker do with each message, without the socket between them.
        self.messages.append({"op": op, **fields})
        if op == "charge":
            self.owner.charge_all(fields["items"])
            return
        self.owner.charge_all(fields["charges"])
        answers = self.owner.decide_all(fields["items"])
        self.store.asker.answered({"op": "decided", "id": fields["id"], "answers": answers})


def _ask(store: SharedStore, now: float, limits: list[Any], probe: AutoBlockProbe | None = None,
         ip: str = "1.2.3.4") -> defer.Deferred[Any]:
    return defer.ensureDeferred(store.decide(now, limits, probe, ip))


def test_two_workers_decide_as_one_memory_store_in_one_message_per_turn() -> None:
    clock = task.Clock()
    blocks: list[tuple[str, float]] = []
    owner = StateOwner(1000, lambda ip, until: blocks.append((ip, until)))
    workers = [SharedStore(clock, BlockList()) for _ in range(2)]
    wires = [_Wire(owner, store) for store in workers]
    reference = MemoryStore(1000)
    asked = [_ask(workers[i % 2], T0 + i * 0.01, _limits()) for i in range(10)]
    assert all(not d.called for d in asked)  # nothing leaves before the end of the reactor turn
    clock.advance(0)
    assert [len(w.messages) for w in wires] == [1, 1]
    got = [d.result for d in asked]  # type: ignore[attr-defined]
    # Worker 0's five questions are decided before worker 1's, as their messages arrive.
    order = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]
    want = [reference.decide(T0 + i * 0.01, _limits()) for i in order]
    assert [got[i] for i in order] == want
    assert [d.allowed for d in want] == [True, True, True, False, False, False, False, False, False, False]


def test_a_block_made_through_one_worker_refuses_the_address_through_the_other() -> None:
    clock = task.Clock()
    announced: list[tuple[str, float]] = []
    owner = StateOwner(1000, lambda ip, until: announced.append((ip, until)))
    first, second = SharedStore(clock, BlockList()), SharedStore(clock, BlockList())
    _Wire(owner, first)
    _Wire(owner, second)
    probe = AutoBlockProbe("5.6.7.8", Rate("auto_block", "a:2:5.6.7.8", 2, 60.0, 2), 300.0)
    answers = [_ask(first, T0, [], probe, "5.6.7.8") for _ in range(3)]
    clock.advance(0)
    assert [d.result.blocked_until for d in answers] == [None, None, T0 + 300.0]  # type: ignore[attr-defined]
    assert answers[2].result.new_block  # type: ignore[attr-defined]
    assert announced == [("5.6.7.8", T0 + 300.0)]
    second.blocked("5.6.7.8", T0 + 300.0)  # what the supervisor's announcement does in a worker
    assert second.blocklist.is_blocked("5.6.7.8", T0 + 1)
    late = _ask(second, T0 + 1, _limits(), None, "5.6.7.8")
    clock.advance(0)
    assert not late.result.allowed and late.result.blocked_until == T0 + 300.0  # type: ignore[attr-defined]
    assert not late.result.new_block  # type: ignore[attr-defined]


def test_questions_fail_as_a_backend_outage_when_the_supervisor_is_gone() -> None:
    clock = task.Clock()
    store = SharedStore(clock, BlockList())
    sent: list[Any] = []
    store.asker.send = lambda op, **fields: sent.append(fields)
    waiting = _ask(store, T0, _limits())
    clock.advance(0)
    store.asker.lost()
    assert _failure(waiting) == "the supervisor is gone"
    assert _failure(_ask(store, T0, _limits())) == "the supervisor is not reachable"


def _budgets() -> list[Any]:
    return [Rate("tokens_per_minute", "t:1000:default:k1", 1000, 60.0, 1000),
            Quota("daily_token_quota", "tokens:k1:20000", 1500, T0 + 3600)]


def test_token_budgets_cross_the_channel_unchanged() -> None:
    item = encode(T0, "1.2.3.4", _limits(), None, _budgets())
    assert decode(item) == (T0, "1.2.3.4", _limits(), None, _budgets())
    assert decode_charge(encode_charge(T0 + 0.25, _budgets(), 321)) == (T0 + 0.25, _budgets(), 321)


def _check(store: SharedStore, now: float) -> defer.Deferred[Any]:
    return defer.ensureDeferred(store.check(now, "1.2.3.4", [], None, _budgets()))


def test_token_budgets_spent_through_two_workers_refuse_through_both_as_one_store_would() -> None:
    clock = task.Clock()
    owner = StateOwner(1000, lambda ip, until: None)
    workers = [SharedStore(clock, BlockList()) for _ in range(2)]
    wires = [_Wire(owner, store) for store in workers]
    reference = MemoryStore(1000)
    # Each request is asked about, then charged its usage, alternately through each worker.
    steps = [(0, 0.0, 0), (0, 0.5, 400), (1, 1.0, 0), (1, 1.5, 400), (0, 2.0, 0), (0, 2.5, 400), (1, 3.0, 0),
             (0, 3.0, 0), (1, 63.0, 0), (1, 63.5, 400), (0, 64.0, 0)]
    got, want = [], []
    for worker, at, charge in steps:
        if charge:
            workers[worker].charge(T0 + at, _budgets(), charge)  # answered by nothing: one-way
            clock.advance(0)
            reference.tokens(T0 + at, _budgets(), charge)
            continue
        d = _check(workers[worker], T0 + at)
        assert not d.called
        clock.advance(0)
        decision, spent = d.result  # type: ignore[attr-defined]
        assert decision.allowed and decision.limit is None  # no request limit: admitted
        got.append(spent)
        want.append(reference.tokens(T0 + at, _budgets()))
    assert got == want
    ops = [m["op"] for w in wires for m in w.messages]
    assert (ops.count("decide"), ops.count("charge")) == (7, 4) and all(w.messages for w in wires)
    # The minute's 1,000 tokens are spent (1,200 charged) by requests of both workers: the next
    # request is refused through either, by the minute's budget. A minute later the minute admits
    # again, until the day's 1,500 are spent too: then it is the day's budget that refuses.
    assert [d.allowed for d in got] == [True] * 3 + [False] * 2 + [True, False]
    assert got[3].limit.name == got[4].limit.name == "tokens_per_minute"
    assert got[3].retry_after > 0 and got[3].remaining == 0
    assert got[6].limit.name == "daily_token_quota"


def test_budgets_are_not_asked_when_the_request_limits_refuse() -> None:
    clock = task.Clock()
    owner = StateOwner(1000, lambda ip, until: None)
    store = SharedStore(clock, BlockList())
    _Wire(owner, store)
    tight = [Rate("per_ip_minute", "m:1.2.3.4", 1, 60.0, 1)]
    answers = [defer.ensureDeferred(store.check(T0, "1.2.3.4", tight, None, _budgets())) for _ in range(2)]
    clock.advance(0)
    (first, first_spent), (second, second_spent) = [d.result for d in answers]  # type: ignore[attr-defined]
    assert first.allowed and first_spent is not None and first_spent.allowed
    assert not second.allowed and second.limit == tight[0] and second_spent is None


def test_token_charges_fail_as_a_backend_outage_when_the_supervisor_is_gone() -> None:
    clock = task.Clock()
    store = SharedStore(clock, BlockList())
    sent: list[tuple[str, Any]] = []
    store.connect(lambda op, **fields: sent.append((op, fields)))
    store.charge(T0, _budgets(), 500)
    store.charge(T0, _budgets(), 20)
    clock.advance(0)
    assert sent == [("charge", {"items": [encode_charge(T0, _budgets(), 500), encode_charge(T0, _budgets(), 20)]})]
    waiting = _check(store, T0)
    clock.advance(0)
    store.lost()
    assert _failure(waiting) == "the supervisor is gone"
    with pytest.raises(RedisUnavailable, match="not reachable"):
        store.charge(T0, _budgets(), 500)


def _failure(d: defer.Deferred[Any]) -> str:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(RedisUnavailable)
    return str(failures[0].value)


def test_connection_slots_are_counted_over_all_workers_and_a_dead_workers_come_back() -> None:
    counts = ConnectionCounts()
    assert [counts.admit(1 + i % 2, "9.9.9.9", 100, 3) for i in range(4)] == [None, None, None,
                                                                              "too_many_connections_per_ip"]
    assert counts.admit(2, "8.8.8.8", 4, None) is None
    assert counts.admit(1, "7.7.7.7", 4, None) == "too_many_connections"
    counts.release(1, "9.9.9.9")
    counts.release(1, "9.9.9.9")  # worker 1 held only two: a duplicate release changes nothing
    counts.release(1, "9.9.9.9")
    assert counts.total == 2 and counts.per_ip["9.9.9.9"] == 1
    assert counts.worker_gone(2) == 2
    assert counts.total == 0 and not counts.per_ip
    counts.release(2, "8.8.8.8")  # after its death: ignored
    assert counts.total == 0


class _Link:
    def __init__(self) -> None:
        self.asked: list[tuple[list[Any], defer.Deferred[Any]]] = []
        self.released: list[str] = []
        self.admissions = self

    def ask(self, item: list[Any]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.asked.append((item, d))
        return d

    def release(self, host: str) -> None:
        self.released.append(host)


class _Gate:
    def __init__(self) -> None:
        self.link = _Link()
        self.pending = 0
        self.refused: list[str] = []

    def refuse(self, reason: str, host: str, config: Any) -> None:
        self.refused.append(reason)

    def config(self) -> None:
        return None


def _admission() -> tuple[_Gate, Protocol, _Admission, StringTransport]:
    gate, inner, transport = _Gate(), Protocol(), StringTransport()
    received: list[bytes] = []
    inner.dataReceived = received.append  # type: ignore[method-assign]
    inner.received = received  # type: ignore[attr-defined]
    admission = _Admission(gate, inner, "9.9.9.9", 100, 10)  # type: ignore[arg-type]
    admission.makeConnection(transport)
    return gate, inner, admission, transport


def test_a_connection_is_not_read_until_the_supervisor_admits_it() -> None:
    gate, inner, admission, transport = _admission()
    assert transport.producerState == "paused" and gate.pending == 1
    assert gate.link.asked[0][0] == ["9.9.9.9", 100, 10]
    assert inner.transport is None
    gate.link.asked[0][1].callback(None)
    assert inner.transport is transport and transport.producerState == "producing" and gate.pending == 0
    admission.dataReceived(b"GET / HTTP/1.1\r\n")
    assert inner.received == [b"GET / HTTP/1.1\r\n"]  # type: ignore[attr-defined]
    admission.connectionLost(Failure(ConnectionDone()))
    assert gate.link.released == ["9.9.9.9"]


def test_a_refused_connection_is_closed_unread_and_a_lost_one_gives_its_slot_back() -> None:
    gate, inner, admission, transport = _admission()
    gate.link.asked[0][1].callback("too_many_connections_per_ip")
    assert transport.disconnecting and inner.transport is None
    assert gate.refused == ["too_many_connections_per_ip"] and gate.link.released == []
    gate, inner, admission, transport = _admission()
    admission.connectionLost(Failure(ConnectionDone()))  # the client left while we asked
    gate.link.asked[0][1].callback(None)
    assert inner.transport is None and gate.link.released == ["9.9.9.9"] and gate.pending == 0


def test_audit_events_wait_for_the_channel_then_leave_in_one_message_per_turn() -> None:
    from types import SimpleNamespace

    from twisted.logger import LogPublisher

    from ccproxy import events
    from ccproxy.config import parse
    from ccproxy.workers.audit import AuditForwarder, portable

    clock = task.Clock()
    link = SharedStore(clock, BlockList())
    config = parse({"server": {"tls": {"enabled": False}},
                    "security": {"audit": {"outputs": [{"type": "file", "path": "/nonexistent/audit.log"}]}}})
    assert config.audit.enabled
    holder = SimpleNamespace(current=SimpleNamespace(config=config))
    forwarder = AuditForwarder(holder, link, publisher=LogPublisher()).start()
    try:
        events.emit("authentication_failure", "warning", ip_address="127.0.0.1", reason=ValueError("bad"))
        clock.advance(0)
        assert len(forwarder.queue) == 1  # no channel yet: kept
        sent: list[dict[str, Any]] = []
        link.connect(lambda op, **fields: sent.append({"op": op, **fields}))
        events.emit("authentication_success", "info", api_key_id="k1")
        clock.advance(0)
        assert [m["op"] for m in sent] == ["audit"]
        assert [e["ccproxy_event"] for e in sent[0]["events"]] == ["authentication_failure", "authentication_success"]
        assert sent[0]["events"][0]["reason"] == "bad"  # what JSON cannot carry travels as text
    finally:
        forwarder.stop()
    assert portable({"log_logger": object(), "log_namespace": "ccproxy.access", "status": 200}) == {
        "log_namespace": "ccproxy.access", "status": 200}


def test_a_successor_keeps_its_audit_events_until_its_predecessor_exits() -> None:
    import os as _os

    from twisted.logger import LogPublisher

    from ccproxy import events
    from ccproxy.workers.heldaudit import POLL, HeldAudit

    clock = task.Clock()
    clock.advance(T0)
    written: list[tuple[float, str]] = []

    class Trail:
        def __init__(self, at: Any) -> None:
            self.at = at

        def __call__(self, event: dict[str, Any]) -> None:
            written.append((self.at.seconds(), event["ccproxy_event"]))

        def stop(self) -> None:
            return None

    held = HeldAudit(Trail, clock, _os.getppid(), publisher=LogPublisher()).start()
    try:
        events.emit("authentication_failure", "warning", ip_address="127.0.0.1")
        clock.advance(5)
        events.emit("rate_limit_exceeded", "warning", ip_address="127.0.0.1")
        clock.advance(POLL * 3)
        assert written == [] and len(held.held) == 2  # the predecessor (our parent) still runs
        held.predecessor = -1  # as if the parent had exited: this process's parent is now another
        clock.advance(POLL)
        assert written == [(T0, "authentication_failure"), (T0 + 5, "rate_limit_exceeded")]
        # From now on the trail observes events itself; what is handed to the holder goes through.
        held({"ccproxy_event": "ip_unblocked", "severity": "notice"})
        assert written[-1] == (clock.seconds(), "ip_unblocked")
    finally:
        held.stop()


def _channel_pair() -> tuple[Any, Any, list[dict[str, Any]], list[str]]:
    from ccproxy.workers.channel import Channel

    got: list[dict[str, Any]] = []
    lost: list[str] = []
    sender = Channel(lambda message: None, lambda: None)
    receiver = Channel(got.append, lambda: lost.append("lost"))
    wire, back = StringTransport(), StringTransport()
    sender.makeConnection(wire)
    receiver.makeConnection(back)
    return sender, receiver, got, lost


@pytest.mark.parametrize("op,fields", [
    ("decide", {"id": 7, "items": [encode(T0 + 0.5, "1.2.3.4", _limits(), None, _budgets())],
                "charges": [encode_charge(T0, _budgets(), 42)]}),
    ("decided", {"id": 7, "answers": [[1, -1, 2, 1.5, 0.0, None, 0, [1, 0, 999, 0.06, 0.0, None, 0]]]}),
    ("charge", {"items": [encode_charge(T0, _budgets(), 42)]}),
    ("admit", {"id": 3, "items": [["1.2.3.4", 100, None]]}),
    ("admitted", {"id": 3, "answers": [None, "too_many_connections"]}),
    ("release", {"hosts": ["1.2.3.4", "::1"]}),
])
def test_the_limiter_messages_cross_the_channel_in_their_compact_form(op: str, fields: dict[str, Any]) -> None:
    sender, receiver, got, _ = _channel_pair()
    sender.send(op, **fields)
    data = sender.transport.value()
    assert data[4] < 0x20  # a tag byte, not the "{" of a JSON message
    assert len(data) < len(json.dumps({"op": op, **fields}))
    receiver.dataReceived(data[:5])  # a message may arrive in pieces
    assert got == []
    receiver.dataReceived(data[5:])
    (message,) = got
    assert message.pop("op") == op
    assert json.loads(json.dumps(message)) == json.loads(json.dumps(fields))  # same values (tuples as lists)


def test_a_compact_message_decodes_to_the_same_limits_and_decision() -> None:
    sender, receiver, got, _ = _channel_pair()
    probe = AutoBlockProbe("1.2.3.4", Rate("auto_block", "a:10:1.2.3.4", 10, 60.0, 10), 300.0)
    sender.send("decide", id=1, items=[encode(T0 + 0.123456789, "1.2.3.4", _limits(), probe, _budgets())], charges=[])
    receiver.dataReceived(sender.transport.value())
    (item,) = got[0]["items"]
    assert decode(item) == (T0 + 0.123456789, "1.2.3.4", _limits(), probe, _budgets())
    crossed = StateOwner(1000, lambda ip, until: None).decide_all(got[0]["items"] * 12)
    direct = StateOwner(1000, lambda ip, until: None)
    assert crossed == [direct.decide(T0 + 0.123456789, "1.2.3.4", _limits(), probe, _budgets()) for _ in range(12)]
    assert crossed[0][0] == 1 and crossed[-1][0] == 0  # the limits do refuse by the twelfth


def test_other_messages_stay_json() -> None:
    sender, receiver, got, _ = _channel_pair()
    sender.send("audit", events=[{"event": "x"}])
    sender.send("decide", id=1)  # not the compact form's fields: sent as JSON, as before
    data = sender.transport.value()
    assert data[4:5] == b"{"
    receiver.dataReceived(data)
    assert got == [{"op": "audit", "events": [{"event": "x"}]}, {"op": "decide", "id": 1}]


@pytest.mark.parametrize("body", [
    b"\x01",  # no payload
    b"\x01" + b"\xff\x00",  # not marshal
    b"\x01" + __import__("marshal").dumps([1, []]),  # a list, not the fields' tuple
    b"\x03" + __import__("marshal").dumps((1, 2)),  # a charge has one field
    b"\x02" + __import__("marshal").dumps((1,))[:-1],  # cut short
])
def test_a_malformed_compact_message_closes_the_channel_without_reaching_the_handler(body: bytes) -> None:
    _, receiver, got, lost = _channel_pair()
    receiver.dataReceived(len(body).to_bytes(4, "big") + body)
    assert got == []
    assert receiver.transport.disconnecting
    receiver.connectionLost(Failure(ConnectionDone()))
    assert lost == ["lost"]


def test_a_peer_that_dies_mid_message_delivers_nothing_of_it() -> None:
    sender, receiver, got, lost = _channel_pair()
    sender.send("decide", id=1, items=[encode(T0, "1.2.3.4", _limits(), None)], charges=[])
    data = sender.transport.value()
    receiver.dataReceived(data[:-3])
    receiver.connectionLost(Failure(ConnectionDone()))
    assert got == [] and lost == ["lost"]
    receiver.connectionLost(Failure(ConnectionDone()))  # once only
    assert lost == ["lost"]


def test_a_turns_charges_ride_ahead_of_its_questions_and_everything_leaves_at_one_call() -> None:
    clock = task.Clock()
    owner = StateOwner(1000, lambda ip, until: None)
    store = SharedStore(clock, BlockList())
    wire = _Wire(owner, store)
    admitted: list[Any] = []
    d = _check(store, T0)
    clock.advance(0)
    assert d.result[1].allowed  # type: ignore[attr-defined]
    # One turn: a connection given back, a request's usage (the minute's whole budget), a new
    # request's question, a new connection asking for its slot.
    store.release("5.5.5.5")
    store.charge(T0 + 1, _budgets(), 1000)
    later = _check(store, T0 + 1)
    slot = store.admissions.ask(["6.6.6.6", 10, None])
    slot.addBoth(admitted.append)
    assert len(clock.getDelayedCalls()) == 1
    sent: list[tuple[str, dict[str, Any]]] = []
    send = store.asker.send

    def spy(op: str, **fields: Any) -> None:
        sent.append((op, fields))
        if op == "decide":
            assert send is not None
            send(op, **fields)

    store.connect(spy)
    clock.advance(0)
    assert [op for op, _ in sent] == ["release", "decide", "admit"]
    assert sent[1][1]["charges"] == [encode_charge(T0 + 1, _budgets(), 1000)]
    # The charge was made before the question: the question sees the minute spent.
    decision, spent = later.result  # type: ignore[attr-defined]
    assert decision.allowed and not spent.allowed and spent.limit.name == "tokens_per_minute"
    assert [m["op"] for m in wire.messages] == ["decide", "decide"]
    store.admissions.answered({"op": "admitted", "id": sent[2][1]["id"], "answers": [None]})
    assert admitted == [None]


def test_an_answer_that_does_not_match_its_questions_fails_them_as_an_outage() -> None:
    clock = task.Clock()
    store = SharedStore(clock, BlockList())
    sent: list[dict[str, Any]] = []
    store.connect(lambda op, **fields: sent.append(fields))
    asked = [_ask(store, T0, _limits()) for _ in range(2)]
    clock.advance(0)
    store.asker.answered({"op": "decided", "id": sent[0]["id"], "answers": [[1, -1, 0, 0.0, 0.0, None, 0]]})
    assert [_failure(d) for d in asked] == ["the supervisor's answer does not match the questions"] * 2
    store.asker.answered({"op": "decided", "id": 999, "answers": []})  # nobody waits for it: ignored


class _SocketTransport(StringTransport):
    """A transport whose handle is a real socket (one end of a pair), as the reactor's is."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def getHandle(self) -> socket.socket:
        return self.sock

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        if not streaming:
            producer.resumeProducing()  # as the reactor's transports do for a pull producer


def _drain(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_messages_go_straight_to_the_socket_and_through_the_transport_only_while_it_is_full() -> None:
    from ccproxy.workers.channel import Channel

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender = Channel(lambda message: None, lambda: None)
    transport = _SocketTransport(ours)
    sender.makeConnection(transport)
    got: list[dict[str, Any]] = []
    receiver = Channel(got.append, lambda: None)
    receiver.makeConnection(StringTransport())
    try:
        sender.send("release", hosts=["1.1.1.1"])
        assert transport.value() == b"" and transport.producer is None  # all of it on the socket
        big = "x" * 2_000_000
        sender.send("reload", text=big, path="/etc/ccproxy/config.yaml")  # more than the socket takes
        sender.send("release", hosts=["2.2.2.2"])
        queued = transport.value()
        assert queued and transport.producer is sender and not transport.streaming
        sender.send("release", hosts=["3.3.3.3"])
        assert transport.value().startswith(queued) and len(transport.value()) > len(queued)  # after it, in order
        receiver.dataReceived(_drain(theirs) + transport.value())
        transport.clear()
        sender.resumeProducing()  # what the transport says once its buffer is written out
        assert transport.producer is None
        sender.send("release", hosts=["4.4.4.4"])
        assert transport.value() == b""
        receiver.dataReceived(_drain(theirs))
        assert [m.get("hosts", [len(m.get("text", ""))]) for m in got] == [
            ["1.1.1.1"], [2_000_000], ["2.2.2.2"], ["3.3.3.3"], ["4.4.4.4"]]
        sender.connectionLost(Failure(ConnectionDone()))
        sender.send("release", hosts=["5.5.5.5"])  # closed: nothing more is written
        assert _drain(theirs) == b""
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("peer", ["full", "closed"])
def test_a_socket_that_takes_nothing_leaves_the_whole_message_to_the_transport(peer: str) -> None:
    from ccproxy.workers.channel import Channel

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        if peer == "full":
            with contextlib.suppress(BlockingIOError):
                while True:
                    ours.send(b"\0" * 65536)
        else:
            theirs.close()
        sender = Channel(lambda message: None, lambda: None)
        transport = _SocketTransport(ours)
        sender.makeConnection(transport)
        sender.send("release", hosts=["1.1.1.1"])
        got: list[dict[str, Any]] = []
        receiver = Channel(got.append, lambda: None)
        receiver.makeConnection(StringTransport())
        receiver.dataReceived(transport.value())  # all of it, whole, for the transport to write (or fail)
        assert got == [{"op": "release", "hosts": ["1.1.1.1"]}]
        assert transport.producer is sender
        sender.stopProducing()  # the transport's word when it stops (the connection ends)
        transport.unregisterProducer()
        transport.clear()
        if peer == "full":
            theirs.setblocking(False)
            _drain(theirs)
        sender.send("release", hosts=["2.2.2.2"])
        # Room again: straight to the socket; the peer gone: to the transport, which closes the channel.
        assert (transport.value() == b"") == (peer == "full")
    finally:
        ours.close()
        theirs.close()


def test_questions_past_one_batch_leave_at_once_and_all_are_answered() -> None:
    clock = task.Clock()
    owner = StateOwner(100_000, lambda ip, until: None)
    store = SharedStore(clock, BlockList())
    wire = _Wire(owner, store)
    asked = [_ask(store, T0, [], None, f"10.0.{i // 250}.{i % 250}") for i in range(300)]
    assert len(wire.messages) == 1 and len(wire.messages[0]["items"]) == 256  # the first batch, full
    clock.advance(0)
    assert [len(m["items"]) for m in wire.messages] == [256, 44]
    assert all(d.result.allowed for d in asked)  # type: ignore[attr-defined]
