"""The masker, whole and streamed: built-in rules, prefix derivation, and split-invariance properties."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter

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
from ccproxy.content.prefix import prefix_pattern
from ccproxy.content.sse import AnthropicStream, OpenAIStream, SseFilter, parse_event
from tests.support.upstream import anthropic_stream, openai_stream

CARD = Rule("credit_card", r"\b\d{4}[\s-]?\d{4}[\s-]?\d{4}[\s-]?\d{4}\b", "XXXX-XXXX-XXXX-XXXX")
RULES = rule_set((*built_in_rules(True, True, True), CARD))
SYSTEM = ("You are Zephyr, the internal assistant of Example Corp. Never reveal the launch code "
          "which is hidden in vault seven (金庫 7), and always answer in formal English — no emoji 🙂.")


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
    stream = AnthropicStream(lambda: StreamMasker(Masker(m.rules, m.prompt), counts))
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
    sse = SseFilter(OpenAIStream(lambda: StreamMasker(Masker(m.rules, m.prompt), counts)), counts, lambda c: None)
    sent = b"".join(sse.feed(c) for c in _byte_chunks(data.draw, upstream)) + sse.close()
    for secret in secrets:
        assert secret.encode() not in sent
    chunks = [c for c in sent.split(b"\n\n") if c]
    assert chunks[-1] == b"data: [DONE]"
    parsed = [json.loads(c[len(b"data: "):]) for c in chunks[:-1]]
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
    stream = AnthropicStream(lambda: StreamMasker(Masker(m.rules, m.prompt), counts))
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
    return SseFilter(OpenAIStream(lambda: StreamMasker(Masker(m.rules, m.prompt), counts)), counts, lambda c: None)


def test_openai_stream_without_finish_reason_flushes_before_done() -> None:
    events = openai_stream(["mail me: bob@exa", "mple.com"])[:-2] + [b"data: [DONE]\n\n"]  # no finish chunk
    sse = _openai_filter()
    out = b"".join(sse.feed(e) for e in events) + sse.close()
    chunks = [c for c in out.split(b"\n\n") if c]
    assert chunks[-1] == b"data: [DONE]"
    text = "".join(json.loads(c[6:])["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text == "mail me: [REDACTED_EMAIL]"
    assert json.loads(chunks[-2][6:])["id"] == "chatcmpl-fake01"  # the extra chunk looks like the others


def test_crlf_events_and_unknown_events_pass() -> None:
    counts: Counter[str] = Counter()
    sse = _anthropic_filter(counts, [])
    start = (b'event: content_block_start\r\ndata: {"type":"content_block_start","index":0,'
             b'"content_block":{"type":"text","text":""}}\r\n\r\n')
    delta = (b'event: content_block_delta\r\ndata: {"type":"content_block_delta","index":0,'
             b'"delta":{"type":"text_delta","text":"call 415-555-0132 now"}}\r\n\r\n')
    odd = b"event: something_new\r\ndata: {not json at all\r\n\r\n: a comment\r\n\r\n"
    stop = b'event: content_block_stop\r\ndata: {"type":"content_block_stop","index":0}\r\n\r\n'
    out = sse.feed(start + delta[:30]) + sse.feed(delta[30:] + odd + stop) + sse.close()
    assert b"415-555" not in out
    assert odd in out and start in out and out.endswith(stop)
    assert counts == {"phone_number": 1}


def test_thinking_and_signature_deltas_pass_unchanged() -> None:
    sse = _anthropic_filter(Counter(), [])
    events = [
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"thinking","thinking":""}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"thinking_delta","thinking":"the key sk-ant-api03-abcdefghijklmnopqrstuv"}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"signature_delta","signature":"EqQBCkYIARgCIkD"}}\n\n',
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    ]
    assert b"".join(sse.feed(e) for e in events) + sse.close() == b"".join(events)


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
