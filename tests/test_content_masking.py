"""The masker, whole and streamed: built-in rules, prefix derivation, and split-invariance properties."""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import re2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccproxy.content.masking import (
    Masker,
    Rule,
    StreamMasker,
    built_in_rules,
    prompt_runs,
    rule_set,
)
from ccproxy.content.parts import DEFAULT_PARTS, Parts
from ccproxy.content.prefix import prefix_pattern
from ccproxy.content.replies import PartMasker, UnsafeReply
from ccproxy.content.sse import AnthropicStream, OpenAIStream, SseFilter, parse_event
from tests.support.upstream import anthropic_stream, openai_stream
from tests.support.upstream import sse as sse_event

CARD = Rule("credit_card", r"\b\d{4}[\s-]?\d{4}[\s-]?\d{4}[\s-]?\d{4}\b", "XXXX-XXXX-XXXX-XXXX")
RULES = rule_set((*built_in_rules(True, True, True), CARD))
SYSTEM = ("You are Zephyr, the internal assistant of Example Corp. Never reveal the launch code "
          "which is hidden in vault seven (金庫 7), and always answer in formal English — no emoji 🙂.")


def every_part(m: Masker, counts: Counter[str]) -> PartMasker:
    """A part masker that masks every kind of part (the masking semantics under test)."""
    return PartMasker(lambda: Masker(m.rules, m.prompt), Parts(True, True, True, True), False, counts)


def masker(prompt: str | None = None) -> Masker:
    return Masker(RULES, prompt_runs(prompt, 32) if prompt else None)


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("key sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv_-0123 end", "anthropic_api_key"),
        ("key sk-proj-AbCdEfGhIjKlMnOpQrStUvWx012345 end", "openai_api_key"),
        ("key sk-AbCdEfGhIjKlMnOpQrStUvWx012345 end", "openai_api_key"),
        ("id AKIAIOSFODNN7EXAMPLE end", "aws_access_key_id"),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY end", "aws_secret_access_key"),
        ("Authorization: Bearer abcdefghijklmnop.qrstuvwxyz-0123 end", "bearer_token"),
        ("tok ghp_abcdefghijklmnopqrstuvwxyz0123456789 end", "github_token"),
        ("tok xoxb-1234567890-abcdefghij end", "slack_token"),
        ("tok AIzaSyA-abcdefghijklmnopqrstuvwxyz12345 end", "google_api_key"),
        ("tok sk_live_abcdefghijklmnop1234 end", "stripe_key"),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N end", "jwt"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY----- end", "private_key"),
        ("mail john.doe+x@mail.example.co.uk end", "email"),
        ("call (415) 555-0132 end", "phone_number"),
        ("call 415-555-0132 end", "phone_number"),
        ("call +1 415 555 0132 end", "phone_number"),
        ("call +44 20 7946 0958 end", "phone_number"),
        ("call +49 (30) 1234567 end", "phone_number"),
        ("card 4111 1111 1111 1111 end", "credit_card"),
    ],
)
def test_built_in_rules_mask(text: str, rule: str) -> None:
    counts: Counter[str] = Counter()
    out = masker().mask(text, counts)
    assert counts == {rule: 1}
    assert out.endswith(" end")
    assert "REDACTED" in out or "XXXX" in out


@pytest.mark.parametrize("text", [
    "The year 2024 had 365 days and version 1.2.3 shipped.",
    "task-list and risk-free words, skill-based",
    "price 12.50 at 10:30 on 2024-05-01",
])
def test_ordinary_text_is_left_alone(text: str) -> None:
    counts: Counter[str] = Counter()
    assert masker().mask(text, counts) == text
    assert not counts


def test_system_prompt_runs_are_removed() -> None:
    text = f"Sure. {SYSTEM[10:90]}| That is all."
    counts: Counter[str] = Counter()
    out = masker(SYSTEM).mask(text, counts)
    assert out == "Sure. [REDACTED_SYSTEM_PROMPT]| That is all."
    assert counts == {"system_prompt": 1}
    # A short common phrase from the prompt is not a leak.
    assert masker(SYSTEM).mask("the launch code") == "the launch code"


def test_seed_patterns_with_flags_compile_and_derive() -> None:
    for pattern in ("(?i)api[_-]?key", "(?i)password", "<script", CARD.pattern):
        assert prefix_pattern(pattern) is not None
        re2.compile(pattern)


def test_rule_without_derivable_prefix_holds_the_block() -> None:
    rules = rule_set((Rule("posix", r"x[[:digit:]]{3}", "[N]"),))
    assert rules.hold_all
    stream = StreamMasker(Masker(rules), Counter())
    assert stream.feed("ab x1") == ""
    assert stream.feed("23 cd") == ""
    assert stream.close() == "ab [N] cd"


@given(st.text(alphabet="ab-_@.x0123456789 sk", max_size=30), st.data())
@settings(max_examples=200, deadline=None)
def test_prefix_pattern_accepts_every_prefix_of_every_match(text: str, data: st.DataObject) -> None:
    for rule in RULES.rules:
        tail = re2.compile("(?:" + (prefix_pattern(rule.pattern) or "") + r")\z")
        for m in re2.compile(rule.pattern).finditer(text):
            piece = m.group(0)
            cut = data.draw(st.integers(0, len(piece)))
            assert tail.fullmatch(piece[:cut]) is not None, (rule.name, piece[:cut])


# Secrets as a client must never see them; each is planted between spaces.
SECRETS = st.one_of(
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", min_size=24, max_size=40)
    .map(lambda s: "sk-ant-api03-" + s),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", min_size=16, max_size=16).map(lambda s: "AKIA" + s),
    st.from_regex(r"[a-z]{3,10}\.[a-z]{2,8}@[a-z]{3,8}\.(com|org|io)", fullmatch=True),
    st.from_regex(r"\([2-9][0-9]{2}\) [2-9][0-9]{2}-[0-9]{4}", fullmatch=True),
    st.from_regex(r"\+44 20 [0-9]{4} [0-9]{4}", fullmatch=True),
    st.sampled_from([SYSTEM[5:60], SYSTEM[40:130], SYSTEM[100:]]),
)
FILLER = st.text(alphabet=st.sampled_from(list("abcdefg hij.,:;-_\n0123456789@+()skéö日本🙂")), max_size=40)


@st.composite
def planted(draw: st.DrawFn) -> tuple[str, list[str]]:
    parts: list[str] = []
    secrets: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        parts.append(draw(FILLER))
        secret = draw(SECRETS)
        secrets.append(secret)
        parts.append(f" {secret} ")
    parts.append(draw(FILLER))
    return "".join(parts), secrets


def split(draw: st.DrawFn, text: str, max_pieces: int = 40) -> list[str]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=max_pieces))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@given(planted(), st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_stream_masking_equals_whole_masking(case: tuple[str, list[str]], data: st.DataObject) -> None:
    text, secrets = case
    whole = masker(SYSTEM).mask(text)
    stream = StreamMasker(masker(SYSTEM), Counter())
    out = "".join(stream.feed(p) for p in split(data.draw, text)) + stream.close()
    assert out == whole
    for secret in secrets:
        assert secret not in out


def _client_text_anthropic(raw: bytes) -> tuple[str, list[bytes]]:
    text, kinds = "", []
    for chunk in raw.split(b"\n\n"):
        if not chunk:
            continue
        name, data = parse_event(chunk + b"\n\n")
        assert name is not None and data is not None
        event = json.loads(data)  # every event is whole, valid JSON
        assert event["type"] == name.decode()
        kinds.append(name)
        if name == b"content_block_delta":
            assert event["index"] == 0
            text += event["delta"]["text"]
    return text, kinds


def _byte_chunks(draw: st.DrawFn, body: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(body)), max_size=20))))
    bounds = [0, *cuts, len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds)]


def _anthropic_filter(counts: Counter[str], reported: list[Counter[str]]) -> SseFilter:
    m = masker(SYSTEM)
    stream = AnthropicStream(every_part(m, counts))
    return SseFilter(stream, counts, reported.append)


@given(planted(), st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_anthropic_sse_split_secrets_never_reach_the_client(case: tuple[str, list[str]], data: st.DataObject) -> None:
    text, secrets = case
    deltas = split(data.draw, text)
    upstream = b"".join(anthropic_stream(deltas))
    counts: Counter[str] = Counter()
    reported: list[Counter[str]] = []
    sse = _anthropic_filter(counts, reported)
    sent = b"".join(sse.feed(c) for c in _byte_chunks(data.draw, upstream)) + sse.close()
    for secret in secrets:
        assert secret.encode() not in sent
    client_text, kinds = _client_text_anthropic(sent)
    assert client_text == masker(SYSTEM).mask(text)
    # Same events in the same order; at most one extra delta, just before the block stops.
    expected = [parse_event(e)[0] for e in anthropic_stream(deltas)]
    assert [k for k in kinds] in (expected, _with_flush(expected))
    # Non-text events pass byte for byte.
    for event in anthropic_stream(deltas):
        if b"content_block_delta" not in event:
            assert event in sent
    assert reported == [counts] and sum(counts.values()) >= len(secrets)


def _with_flush(kinds: list[bytes | None]) -> list[bytes | None]:
    i = kinds.index(b"content_block_stop")
    return [*kinds[:i], b"content_block_delta", *kinds[i:]]


@given(planted(), st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_openai_sse_split_secrets_never_reach_the_client(case: tuple[str, list[str]], data: st.DataObject) -> None:
    text, secrets = case
    deltas = split(data.draw, text) or [""]
    upstream = b"".join(openai_stream(deltas))
    counts: Counter[str] = Counter()
    m = masker(SYSTEM)
    sse = SseFilter(OpenAIStream(every_part(m, counts)), counts, lambda c: None)
    sent = b"".join(sse.feed(c) for c in _byte_chunks(data.draw, upstream)) + sse.close()
    for secret in secrets:
        assert secret.encode() not in sent
    chunks = [c for c in sent.split(b"\n\n") if c]
    assert chunks[-1] == b"data: [DONE]"
    parsed = [json.loads(parse_event(c)[1] or b"") for c in chunks[:-1]]
    assert len(parsed) == len(deltas) + 1
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in parsed) == m.mask(text)
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"


def test_held_tail_is_only_what_could_grow() -> None:
    stream = StreamMasker(masker(), Counter())
    assert stream.feed("Hello world, ") == "Hello world, "
    assert stream.feed("my key is sk-ant-") == "my key is "
    assert stream.feed("api03-abcdefghijklmnopqrstuvwxyz ") == "[REDACTED_API_KEY] "
    assert stream.close() == ""


def test_tool_input_json_stays_valid() -> None:
    counts: Counter[str] = Counter()
    m = masker()
    stream = AnthropicStream(every_part(m, counts))
    source = json.dumps({"to": "jane@example.com", "note": 'say "hi"'})
    events = [
        b'event: content_block_start\ndata: {"type":"content_block_start","index":1,'
        b'"content_block":{"type":"tool_use","id":"t","name":"mail","input":{}}}\n\n',
        *(
            b"event: content_block_delta\ndata: " + json.dumps(
                {"type": "content_block_delta", "index": 1,
                 "delta": {"type": "input_json_delta", "partial_json": source[i:i + 5]}}).encode() + b"\n\n"
            for i in range(0, len(source), 5)
        ),
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n',
    ]
    out = b"".join(stream.event(e) for e in events)
    joined = "".join(
        json.loads(parse_event(c + b"\n\n")[1] or b"")["delta"]["partial_json"]
        for c in out.split(b"\n\n") if b"input_json_delta" in c
    )
    assert json.loads(joined) == {"to": "[REDACTED_EMAIL]", "note": 'say "hi"'}
    assert counts == {"email": 1}


@pytest.mark.parametrize("named", [False, True])
def test_the_matching_rule_is_named_even_with_groups_in_patterns(named: bool) -> None:
    second = r"(?P<n>q)(w)" if named else r"(q)(w)"
    rules = rule_set((Rule("a", r"(x)(y)?z", "[A]"), Rule("b", second, "[B]"), Rule("c", r"(?P<n>e)(f)", "[C]")))
    counts: Counter[str] = Counter()
    assert Masker(rules).mask("xz qw ef xyz", counts) == "[A] [B] [C] [A]"
    assert counts == {"a": 2, "b": 1, "c": 1}


def test_earlier_rule_wins_at_the_same_position() -> None:
    rules = rule_set((Rule("short", r"ab", "[S]"), Rule("long", r"abcd", "[L]")))
    assert Masker(rules).mask("abcd") == "[S]cd"
    stream = StreamMasker(Masker(rules), Counter())
    assert stream.feed("abc") + stream.feed("d") + stream.close() == "[S]cd"


def test_held_tail_is_bounded() -> None:
    from ccproxy.content.masking import MAX_HOLD

    stream = StreamMasker(masker(), Counter())
    sent = stream.feed("key: sk-")
    for _ in range(MAX_HOLD // 1000 + 1):
        sent += stream.feed("A" * 1000)
    assert sent == "key: [REDACTED_API_KEY]"  # masked when the hold limit was passed
    assert len(stream.pending) < 1000
    sent += stream.feed("A" * 10 + " done") + stream.close()
    assert sent.startswith("key: [REDACTED_API_KEY]") and sent.endswith(" done")


def test_brace_quantifier_re2_reads_literally_is_not_analysed() -> None:
    assert prefix_pattern("a{,5}") is None
    rules = rule_set((Rule("brace", "a{,5}", "[B]"),))
    stream = StreamMasker(Masker(rules), Counter())
    assert stream.feed("xa{") + stream.feed(",5}y") + stream.close() == "x[B]y"


def _openai_filter() -> SseFilter:
    counts: Counter[str] = Counter()
    m = masker()
    return SseFilter(OpenAIStream(every_part(m, counts)), counts, lambda c: None)


def test_openai_stream_without_finish_reason_flushes_before_done() -> None:
    events = openai_stream(["mail me: bob@exa", "mple.com"])[:-2] + [b"data: [DONE]\n\n"]  # no finish chunk
    sse = _openai_filter()
    out = b"".join(sse.feed(e) for e in events) + sse.close()
    chunks = [c for c in out.split(b"\n\n") if c]
    assert chunks[-1] == b"data: [DONE]"
    parsed = [json.loads(parse_event(c)[1] or b"") for c in chunks[:-1]]
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in parsed)
    assert text == "mail me: [REDACTED_EMAIL]"
    assert parsed[-1]["id"] == "chatcmpl-fake01"  # the extra chunk looks like the others
    assert chunks[-2].startswith(b": ccproxy-masked email=1\n")  # the client is told


@pytest.mark.parametrize("eol", [b"\r\n", b"\r", b"\n"])
def test_events_framed_with_any_line_ending_are_masked_and_sent_with_lf(eol: bytes) -> None:
    counts: Counter[str] = Counter()
    sse = _anthropic_filter(counts, [])
    start = (b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
             b'"content_block":{"type":"text","text":""}}\n\n')
    delta = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
             b'"delta":{"type":"text_delta","text":"call 415-555-0132 now"}}\n\n')
    odd = b"event: something_new\ndata: {not json at all\n\n: a comment\n\n"
    stop = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    wire = (start + delta + odd + stop).replace(b"\n", eol)
    cut = wire.index(b"555") + 1  # the cut falls inside the number, and a CRLF may be split too
    out = b"".join(sse.feed(wire[i : min(i + 7, cut)]) for i in range(0, cut, 7)) + sse.feed(wire[cut:]) + sse.close()
    assert b"415-555" not in out and b"\r" not in out
    assert odd in out and start in out and out.endswith(stop)
    assert counts == {"phone_number": 1}


def test_events_without_an_event_line_are_masked() -> None:
    counts: Counter[str] = Counter()
    sse = _anthropic_filter(counts, [])
    events = [e.split(b"\n", 1)[1] for e in anthropic_stream(["mail bob@exa", "mple.com ok"])]
    out = b"".join(sse.feed(e) for e in events) + sse.close()
    assert b"bob@" not in out and counts == {"email": 1}
    assert b"event:" not in out  # the added events are framed like the stream's own


def _json_split_mask(source: str, pieces: list[str]) -> str:
    from ccproxy.content.masking import JsonStringMasker

    counts: Counter[str] = Counter()
    m = masker(SYSTEM)
    json_masker = JsonStringMasker(lambda: StreamMasker(Masker(m.rules, m.prompt), counts))
    return "".join(json_masker.feed(p) for p in pieces) + json_masker.close()


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), planted().map(lambda c: c[0]), FILLER),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["to", "body", "path", "x"]), inner, max_size=3)),
    max_leaves=6,
)


@given(JSON_VALUES, st.booleans(), st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_streamed_tool_input_masks_every_string_and_stays_json(value: object, ascii_only: bool,
                                                               data: st.DataObject) -> None:
    from ccproxy.content.masking import mask_strings

    source = json.dumps({"input": value}, ensure_ascii=ascii_only)  # \\uXXXX escapes, surrogate pairs
    out = _json_split_mask(source, split(data.draw, source))
    assert json.loads(out) == mask_strings({"input": value}, masker(SYSTEM), Counter())


def test_tool_input_secret_after_an_escape_is_found() -> None:
    source = json.dumps({"content": "line one\nsk-ant-api03-abcdefghijklmnopqrstuvwxyz\tAKIAIOSFODNN7EXAMPLE"})
    out = _json_split_mask(source, [source[i : i + 3] for i in range(0, len(source), 3)])
    assert json.loads(out) == {"content": "line one\n[REDACTED_API_KEY]\t[REDACTED_API_KEY]"}


def test_deltas_without_a_block_start_are_still_masked() -> None:
    sse = _anthropic_filter(Counter(), [])
    events = [e for e in anthropic_stream(["key sk-ant-api03-", "abcdefghijklmnopqrstuvwxyz done"])
              if b"content_block_start" not in e]
    out = b"".join(sse.feed(e) for e in events) + sse.close()
    assert b"abcdefghijklmnop" not in out
    assert _client_text_anthropic(out)[0] == "key [REDACTED_API_KEY] done"


# Every construct the prefix derivation serialises, each with a string no match can begin with.
CONSTRUCTS = [
    (r"x[^a]y", "xa"),                      # a negated single character
    (r"(?:ab|cd){2}z", "ac"),               # a branch repeated: serialised in full before the last copy
    (r"\bkey\b-\d+", "kex"),                # word boundaries dropped
    (r"^id=\w{3}$", "ix"),                  # anchors dropped
    (r"(?i)tok(?-i:EN)\D", "tokx"),         # global flags, and a group that turns one off
    (r"a(?i:b(?s:.)c)+d", "ax"),            # flags switched on inside a repeated group
    (r"q{0}r[\s\S]", "q"),                  # a repeat of nothing
    (r"v+?w", "x"),                         # a lazy repeat
    (r"n{1200}", "m"),                      # a count above RE2's limit
    (r"[a-c\d]{2,4}!", "!"),                # a class with a range and a category
    (r"[^ab]{2}()c", "a"),                  # a negated class; an empty group
]


@pytest.mark.parametrize(("pattern", "never"), CONSTRUCTS)
@given(data=st.data())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_prefix_pattern_of_each_construct(pattern: str, never: str, data: st.DataObject) -> None:
    derived = prefix_pattern(pattern)
    assert derived is not None
    tail = re2.compile("(?:" + derived + r")\z")
    # Matches as RE2 reads the pattern: its \d, \w and \s are ASCII.
    match = data.draw(st.from_regex(re.compile(pattern, re.ASCII), fullmatch=True), label="match")
    cut = data.draw(st.integers(0, len(match)), label="cut")
    assert tail.fullmatch(match[:cut]) is not None, (pattern, match[:cut])
    assert tail.fullmatch(never) is None  # a superset, but not everything


@pytest.mark.parametrize("pattern", [r"(?=a)b", r"(a)\1", r"x(?<!y)", r"(?:a(?=b))+c", r"[[:alpha:]]", r"\pL",
                                     r"(?U)a+", r"a("])
def test_patterns_the_derivation_cannot_read_give_none(pattern: str) -> None:
    assert prefix_pattern(pattern) is None


def test_min_width() -> None:
    from ccproxy.content.prefix import min_width

    assert min_width(r"ab+c?") == 2
    assert min_width(r"(?:xy|z){2}") == 2
    assert min_width(r"[[:digit:]]") is None  # RE2 syntax Python's parser reads otherwise
    assert min_width(r"a(") is None
THINKING_EVENTS = [
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"thinking","thinking":""}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"thinking_delta","thinking":"the key sk-ant-api03-abcdefghijklmnopqrstuv"}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"signature_delta","signature":"EqQBCkYIARgCIkD"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
]


def _default_filter(counts: Counter[str], parts: Parts = DEFAULT_PARTS, structured: bool = False) -> SseFilter:
    m = masker()
    pm = PartMasker(lambda: Masker(m.rules, m.prompt), parts, structured, counts)
    return SseFilter(AnthropicStream(pm), counts, lambda c: None)


def test_thinking_is_masked_by_default_and_its_signature_passes() -> None:
    counts: Counter[str] = Counter()
    sse = _default_filter(counts)
    out = b"".join(sse.feed(e) for e in THINKING_EVENTS) + sse.close()
    assert b"sk-ant-api03" not in out and counts == {"anthropic_api_key": 1}
    assert THINKING_EVENTS[2] in out  # signature_delta byte for byte


def test_thinking_passes_unchanged_when_its_part_is_off() -> None:
    sse = _default_filter(Counter(), Parts(thinking=False))
    assert b"".join(sse.feed(e) for e in THINKING_EVENTS) + sse.close() == b"".join(THINKING_EVENTS)


@functools.cache
def _example_layer() -> Any:
    from ccproxy.config import load
    from ccproxy.content.layer import ContentLayer

    example = Path(__file__).resolve().parents[1] / "etc" / "ccproxy" / "config.yaml"
    return ContentLayer(load(str(example), environ={}).content)


def _example_filter() -> Any:
    """The response filter the example config (etc/ccproxy/config.yaml) puts on a Messages stream."""
    from twisted.web.http_headers import Headers

    from tests.test_content_validation import make_ctx, messages_body

    ctx = make_ctx(messages_body(system="You are a coding agent in /tmp/x. " * 20))
    return _example_layer().response_filter(ctx, 200, Headers({b"content-type": [b"text/event-stream"]}))


def _tool_use_events(source: str, pieces: list[str], index: int = 1) -> list[bytes]:
    start = {"type": "content_block_start", "index": index,
             "content_block": {"type": "tool_use", "id": "toolu_1", "name": "Write", "input": {}}}
    events = [sse_event("content_block_start", start)]
    for piece in pieces:
        events.append(sse_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                        "delta": {"type": "input_json_delta", "partial_json": piece}}))
    events.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


def _partial_json(out: bytes) -> str:
    joined = ""
    for chunk in out.split(b"\n\n"):
        _, data = parse_event(chunk + b"\n\n")
        if data and b"input_json_delta" in data:
            joined += json.loads(data)["delta"]["partial_json"]
    return joined


TOOL_INPUT = json.dumps({
    "file_path": "/home/dev/project/.env",
    "content": f"DB_PASSWORD=hunter2\nANTHROPIC_API_KEY={'sk-ant-api03-' + 'A' * 30}\nowner: bob@example.com\n"
               "call (415) 555-0132, card 4111 1111 1111 1111\n",
})


@given(JSON_VALUES, st.data())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_tool_input_is_byte_identical_under_the_default_parts_at_every_split(value: object,
                                                                            data: st.DataObject) -> None:
    source = json.dumps({"file_path": "/tmp/x", "content": value})
    pieces = split(data.draw, source) or [source]
    wire = b"".join(_tool_use_events(source, pieces))
    for cut in range(len(wire) + 1):  # every split of the byte stream in two
        sse = _example_filter()
        out = sse.feed(wire[:cut]) + sse.feed(wire[cut:]) + sse.close()
        assert _partial_json(out) == source


def test_the_example_tool_input_passes_whole_at_every_split() -> None:
    wire = b"".join(_tool_use_events(TOOL_INPUT, [TOOL_INPUT[i : i + 9] for i in range(0, len(TOOL_INPUT), 9)]))
    for cut in range(len(wire) + 1):
        sse = _example_filter()
        out = sse.feed(wire[:cut]) + sse.feed(wire[cut:]) + sse.close()
        assert out == wire


def test_tool_inputs_are_masked_when_their_part_is_on() -> None:
    counts: Counter[str] = Counter()
    sse = _default_filter(counts, Parts(tool_inputs=True))
    wire = b"".join(_tool_use_events(TOOL_INPUT, [TOOL_INPUT[i : i + 9] for i in range(0, len(TOOL_INPUT), 9)]))
    out = sse.feed(wire) + sse.close()
    masked = json.loads(_partial_json(out))
    assert "sk-ant" not in masked["content"] and "bob@" not in masked["content"]
    assert counts["anthropic_api_key"] == 1 and counts["email"] == 1


def test_text_delta_inside_a_tool_use_block_is_masked() -> None:
    counts: Counter[str] = Counter()
    sse = _default_filter(counts)
    events = _tool_use_events("{}", ["{}"])
    odd = sse_event("content_block_delta", {"type": "content_block_delta", "index": 1,
                                            "delta": {"type": "text_delta", "text": "mail bob@example.com"}})
    out = b"".join(sse.feed(e) for e in [*events[:2], odd, events[2]]) + sse.close()
    assert b"bob@example.com" not in out and counts == {"email": 1}


def test_citations_are_masked() -> None:
    counts: Counter[str] = Counter()
    sse = _default_filter(counts)
    event = sse_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
        "type": "citations_delta", "citation": {"type": "char_location", "cited_text": "write to bob@example.com",
                                                "document_title": "call 415-555-0132"}}})
    out = sse.feed(event) + sse.close()
    assert b"bob@" not in out and b"415-555" not in out and counts == {"email": 1, "phone_number": 1}


def test_structured_output_text_passes_unless_its_part_is_on() -> None:
    events = anthropic_stream(['{"owner": "bob@exam', 'ple.com"}'])
    sse = _default_filter(Counter(), structured=True)
    assert b"".join(sse.feed(e) for e in events) + sse.close() == b"".join(events)
    sse = _default_filter(Counter(), Parts(structured_outputs=True), structured=True)
    assert b"bob@" not in b"".join(sse.feed(e) for e in events) + sse.close()


def test_stream_event_with_duplicate_keys_cuts_the_stream() -> None:
    sse = _default_filter(Counter())
    with pytest.raises(UnsafeReply):
        sse.feed(b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                 b'"delta":{"type":"text_delta","text":"bob@example.com","text":"x"}}\n\n')


def test_openai_streamed_tool_arguments_pass_and_refusals_are_masked() -> None:
    counts: Counter[str] = Counter()
    m = masker()
    pm = PartMasker(lambda: Masker(m.rules, m.prompt), Parts(), False, counts)
    sse = SseFilter(OpenAIStream(pm), counts, lambda c: None)
    args = json.dumps({"to": "bob@example.com"})
    chunks = [
        {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "mail", "arguments": args[:9]}}]}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": args[9:]}}]}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"refusal": "no, bob@exa"}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"refusal": "mple.com"}, "finish_reason": "stop"}]},
    ]
    wire = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]
    out = b"".join(sse.feed(e) for e in wire) + sse.close()
    assert wire[0] in out and wire[1] in out
    refusal = "".join(json.loads(parse_event(c)[1] or b"")["choices"][0]["delta"].get("refusal") or ""
                      for c in out.split(b"\n\n")[2:4])
    assert refusal == "no, [REDACTED_EMAIL]" and counts == {"email": 1}


CORPUS = [json.loads(line) for line in
          (Path(__file__).parent / "data" / "masking_corpus.jsonl").read_text().splitlines() if line]


@pytest.mark.parametrize("case", CORPUS, ids=[c["text"].encode("unicode_escape").decode()[:40] for c in CORPUS])
def test_detector_corpus(case: dict[str, Any]) -> None:
    counts: Counter[str] = Counter()
    out = masker().mask(case["text"], counts)
    if case["rule"] is None:
        assert out == case["text"] and not counts
    else:
        assert set(counts) == {case["rule"]}
        # Nothing of the value is left but what came before it.
        assert out.endswith("]") or out.endswith("[REDACTED_PHONE]")
        stream = StreamMasker(masker(), Counter())
        assert "".join(stream.feed(ch) for ch in case["text"]) + stream.close() == out


def _responses_events(deltas: list[str], args: list[str]) -> list[bytes]:
    def ev(kind: str, **fields: Any) -> bytes:
        return sse_event(kind, {"type": kind, **fields})

    text = "".join(deltas)
    out = [ev("response.created", response={"id": "r", "output": []})]
    out += [ev("response.output_text.delta", item_id="m1", output_index=0, content_index=0, delta=d) for d in deltas]
    out.append(ev("response.output_text.done", item_id="m1", output_index=0, content_index=0, text=text))
    out += [ev("response.function_call_arguments.delta", item_id="f1", output_index=1, delta=a) for a in args]
    out.append(ev("response.function_call_arguments.done", item_id="f1", output_index=1, arguments="".join(args)))
    out.append(ev("response.completed", response={"id": "r", "output": [
        {"type": "message", "content": [{"type": "output_text", "text": text}]},
        {"type": "function_call", "call_id": "c", "name": "mail", "arguments": "".join(args)}],
        "usage": {"input_tokens": 3, "output_tokens": 4}}))
    return out


def test_responses_stream_masks_text_across_deltas_and_passes_tool_arguments() -> None:
    from ccproxy.content.sse import ResponsesStream

    counts: Counter[str] = Counter()
    m = masker()
    seen: list[dict[str, Any]] = []
    pm = PartMasker(lambda: Masker(m.rules, m.prompt), Parts(), False, counts)
    sse = SseFilter(ResponsesStream(pm, seen.append), counts, lambda c: None)
    args = json.dumps({"to": "bob@example.com"})
    events = _responses_events(["write to bob@exa", "mple.com now"], [args[:8], args[8:]])
    out = b"".join(sse.feed(e) for e in events) + sse.close()
    streamed = "".join(json.loads(parse_event(c)[1] or b"")["delta"] for c in out.split(b"\n\n")
                       if b"output_text.delta" in c)
    assert streamed == "write to [REDACTED_EMAIL] now"
    final = json.loads(parse_event(out.split(b"\n\n")[-2])[1] or b"")
    assert final["response"]["output"][0]["content"][0]["text"] == "write to [REDACTED_EMAIL] now"
    assert final["response"]["output"][1]["arguments"] == args  # a tool call's arguments pass intact
    for event in events[4:7]:  # the function call's argument events, byte for byte
        assert event in out
    assert any(e.get("type") == "response.completed" for e in seen)


def test_openai_streamed_tool_arguments_are_masked_when_their_part_is_on() -> None:
    counts: Counter[str] = Counter()
    m = masker()
    pm = PartMasker(lambda: Masker(m.rules, m.prompt), Parts(tool_inputs=True), False, counts)
    sse = SseFilter(OpenAIStream(pm), counts, lambda c: None)
    args = json.dumps({"to": "bob@example.com"})
    pieces = [args[i : i + 5] for i in range(0, len(args), 5)]
    chunks = [{"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": p}}]}, "finish_reason": None}]} for p in pieces]
    chunks.append({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    out = b"".join(sse.feed(f"data: {json.dumps(c)}\n\n".encode()) for c in chunks) + sse.close()
    joined = ""
    for c in out.split(b"\n\n"):
        data = parse_event(c + b"\n\n")[1]
        if data:
            for choice in json.loads(data)["choices"]:
                for call in choice.get("delta", {}).get("tool_calls", []):
                    joined += call["function"]["arguments"]
    assert json.loads(joined) == {"to": "[REDACTED_EMAIL]"} and counts == {"email": 1}


def test_an_event_without_end_is_refused_not_buffered_without_bound() -> None:
    from ccproxy.content.sse import MAX_EVENT, EventSplitter, EventTooLarge

    splitter = EventSplitter()
    piece = b"data: " + b"x" * 65536
    with pytest.raises(EventTooLarge):
        for _ in range(MAX_EVENT // len(piece) + 2):
            assert splitter.feed(piece) == []
    assert len(splitter.buffer) <= MAX_EVENT + len(piece)
