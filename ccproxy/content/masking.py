"""The masker: which text a response may not carry, and how to hide it, whole or streamed.

Masking semantics (the same for a whole text and for a stream of pieces of it): scan left to right;
at each position take the leftmost match of any rule (a system-prompt run first, then the rules in
order: built-ins, then `mask_patterns`); replace it with the rule's replacement (literal text, no
back-references); carry on after it. `StreamMasker` gives exactly the same output as `Masker.mask`
on the joined text, whatever the split, holding back only a tail that could still grow into a match.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import re2

from ccproxy._compat import Re2Pattern, re2_span
from ccproxy.content.prefix import prefix_pattern

SYSTEM_PROMPT_RULE = "system_prompt"
SYSTEM_PROMPT_REPLACEMENT = "[REDACTED_SYSTEM_PROMPT]"

_OPTIONS = re2.Options()
_OPTIONS.max_mem = 64 << 20
_OPTIONS.log_errors = False


def compile_re2(pattern: str) -> Re2Pattern:
    """Compile with the options every content pattern uses; raises re2.error."""
    return re2.compile(pattern, options=_OPTIONS)


@attrs.frozen
class Rule:
    name: str
    pattern: str
    replacement: str


# Characters that render as nothing (zero-width space/joiners, word joiner, BOM, soft hyphen): a key
# with one inside still reads, and copies, as the key. Key rules accept them anywhere in the key.
_FMT = "\u00ad\u200b-\u200d\u2060\ufeff"


def _lit(prefix: str) -> str:
    """A literal key prefix that may have invisible characters between its letters."""
    return f"[{_FMT}]*".join(re2.escape(ch) for ch in prefix)


def _body(chars: str, count: str) -> str:
    return f"[{_FMT}{chars}]{count}"


# The built-in rules, by the config switch that turns them on. Keep docs/content-filtering.md in step.
# Distinctive key prefixes need no word boundary before them: `Xsk-ant-...` and `key_sk-ant-...`
# are still keys. Only the generic `sk-` (legacy OpenAI keys) keeps one, or any word ending in
# "sk" followed by a long hyphenated name would be masked.
API_KEY_RULES = (
    Rule("anthropic_api_key", _lit("sk-ant-") + _body("A-Za-z0-9_-", "{16,}"), "[REDACTED_API_KEY]"),
    Rule("openai_api_key",
         rf"(?:{_lit('sk-')}(?:{_lit('proj-')}|{_lit('svcacct-')}|{_lit('admin-')})|\bsk-)"
         + _body("A-Za-z0-9_-", "{20,}"), "[REDACTED_API_KEY]"),
    Rule("aws_access_key_id",
         r"(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}\b", "[REDACTED_API_KEY]"),
    Rule("aws_secret_access_key",
         r"(?i)aws_?secret_?access_?key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{40}\b", "[REDACTED_API_KEY]"),
    Rule("bearer_token", r"\b[Bb]earer\s+[A-Za-z0-9._~+/-]{16,}=*", "Bearer [REDACTED_TOKEN]"),
    Rule("github_token",
         rf"(?:gh[pousr]_{_body('A-Za-z0-9', '{36,}')}|{_lit('github_pat_')}{_body('A-Za-z0-9_', '{22,}')})",
         "[REDACTED_API_KEY]"),
    Rule("slack_token", "xox[abprse]-" + _body("A-Za-z0-9-", "{10,}"), "[REDACTED_API_KEY]"),
    Rule("google_api_key", "AIza" + _body("0-9A-Za-z_-", "{35}"), "[REDACTED_API_KEY]"),
    Rule("stripe_key", r"[rsp]k_(?:live|test)_" + _body("0-9A-Za-z", "{16,}"), "[REDACTED_API_KEY]"),
    Rule("jwt", r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", "[REDACTED_TOKEN]"),
    Rule("private_key",
         r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[A-Za-z0-9+/=\s]*(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----)?",
         "[REDACTED_PRIVATE_KEY]"),
)
# Letters of the Latin, Greek and Cyrillic scripts and CJK ideographs: internationalised addresses.
_LETTERS = "A-Za-z\u00c0-\u024f\u0370-\u03ff\u0400-\u04ff\u3040-\u30ff\u4e00-\u9fff"
EMAIL_RULES = (
    # A local part; `@` or its fullwidth/small forms; then an IP literal, `localhost`, or a dotted
    # domain (IDN labels too) ending in a label of 2+ letters (so `pkg@1.2.3` is not an address).
    Rule("email",
         f"[{_LETTERS}0-9._%+-]{{1,64}}[@\uff20\ufe6b](?:\\[[0-9A-Fa-f:.]{{2,45}}\\]|localhost\\b|"
         f"[{_LETTERS}0-9-]+(?:\\.[{_LETTERS}0-9-]+)*\\.[{_LETTERS}]{{2,}})", "[REDACTED_EMAIL]"),
)
PHONE_RULES = (
    # North American: (415) 555-0132, 415-555-0132, +1 415 555 0132, 4155550132.
    Rule("phone_number",
         r"(?:\+1[ .-]?|\b1[ .-])?(?:\([2-9]\d{2}\)|\b[2-9]\d{2})[ .-]?[2-9]\d{2}[ .-]?\d{4}\b", "[REDACTED_PHONE]"),
    # International, with a + or 00 prefix: +44 20 7946 0958, +49 (30) 1234567, 0033 1 23 45 67 89.
    Rule("phone_number",
         r"(?:\+|\b00)[1-9]\d{0,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}\b", "[REDACTED_PHONE]"),
)


@attrs.frozen
class Match:
    start: int
    end: int
    name: str
    replacement: bytes


# Everything below works on UTF-8 bytes: the RE2 wrapper re-encodes a str on every call, which
# made each match cost a pass over the whole text. Hold-back points are moved back to a character
# boundary so what is sent always decodes.
def _char_floor(text: bytes, i: int) -> int:
    while 0 < i < len(text) and text[i] & 0xC0 == 0x80:
        i -= 1
    return i


def _at_char(text: bytes, i: int) -> bool:
    return i >= len(text) or text[i] & 0xC0 != 0x80


_LATIN1 = re2.Options()
_LATIN1.max_mem = 64 << 20
_LATIN1.log_errors = False
_LATIN1.encoding = re2.Options.Encoding.LATIN1


class PromptRuns:
    """Finds runs of at least `min_run` bytes copied verbatim from a system prompt.

    At each position the longest run starting there is taken. Candidates come from an RE2 search
    for aligned blocks of the prompt (every run of `min_run` bytes contains one), so text that
    repeats nothing costs one linear scan.
    """

    def __init__(self, prompt: str, min_run: int) -> None:
        self.prompt = prompt.encode()
        self.min_run = min_run
        self.block = (min_run + 1) // 2
        data, size = self.prompt, self.block
        blocks = {data[i : i + size] for i in range(0, len(data) - size + 1, size)}
        # Latin-1 mode: blocks are raw bytes and may cut a UTF-8 character.
        self.finder = (
            re2.compile(b"|".join(re2.escape(b) for b in sorted(blocks)), options=_LATIN1) if blocks else None
        )
        self.replacement = SYSTEM_PROMPT_REPLACEMENT.encode()
        # The start of every suffix of the prompt, sorted: "is this piece in the prompt?" becomes a
        # binary search instead of a scan of the whole prompt (asked many times per streamed delta).
        self.key_len = max(64, min_run)
        self.keys = sorted(data[i : i + self.key_len] for i in range(len(data)))
        # Hashes of every min_run-byte window: a cheap first test for each candidate position.
        self.windows = {hash(data[i : i + min_run]) for i in range(len(data) - min_run + 1)}

    def contains(self, piece: bytes) -> bool:
        if len(piece) > self.key_len:
            return piece in self.prompt
        at = bisect.bisect_left(self.keys, piece)
        return at < len(self.keys) and self.keys[at].startswith(piece)

    def search(self, text: bytes, pos: int) -> Match | None:
        if self.finder is None:
            return None
        reach = self.min_run - self.block
        while True:
            hit = re2_span(self.finder, text, pos)
            if hit is None:
                return None
            at = hit[0]
            for i in range(max(pos, at - reach), at + 1):
                window = text[i : i + self.min_run]
                if hash(window) in self.windows and _at_char(text, i) and self.contains(window):
                    end = _char_floor(text, self._extend(text, i))
                    if end - i >= self.min_run:
                        return Match(i, end, SYSTEM_PROMPT_RULE, self.replacement)
            pos = at + 1

    def _extend(self, text: bytes, start: int) -> int:
        """The end of the longest run from `start` found in the prompt (one of min_run is known)."""
        low, high = self.min_run, min(len(text) - start, len(self.prompt))
        while low < high:
            mid = (low + high + 1) // 2
            if self.contains(text[start : start + mid]):
                low = mid
            else:
                high = mid - 1
        return start + low

    def viable(self, text: bytes, pos: int) -> int:
        """The earliest position from which the rest of `text` is a piece of the prompt."""
        low, high = 0, len(text) - pos
        while low < high:
            mid = (low + high + 1) // 2
            if self.contains(text[len(text) - mid :]):
                low = mid
            else:
                high = mid - 1
        return len(text) - low


@functools.lru_cache(maxsize=8)
def prompt_runs(prompt: str, min_run: int) -> PromptRuns:
    # Clients resend the same system prompt on every turn: build its finder once.
    return PromptRuns(prompt, min_run)


class RuleSet:
    """Compiled rules: one combined search, one combined "could still grow" search."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self.compiled = tuple(compile_re2(r.pattern) for r in self.rules)
        self.replacements = tuple(r.replacement.encode() for r in self.rules)
        self.combined = compile_re2("|".join(f"(?:{r.pattern})" for r in self.rules)) if rules else None
        # The same alternation with one capture group per rule, run only over a span already found
        # (captures would slow the search itself): it tells which rule matched in one call. Rules
        # whose own group names clash cannot share it and fall back to asking each rule in turn.
        self.which: Re2Pattern | None = None
        self.group_of: dict[int, int] = {}
        if rules:
            try:
                self.which = compile_re2("|".join(f"({r.pattern})" for r in self.rules))
                starts = itertools.accumulate((1 + c.groups for c in self.compiled[:-1]), initial=1)
                self.group_of = {group: k for k, group in enumerate(starts)}
            except re2.error:
                self.which = None
        prefixes = [prefix_pattern(r.pattern) for r in self.rules]
        # A rule whose prefixes cannot be derived holds back everything not yet final.
        self.hold_all = any(p is None for p in prefixes)
        self.tail = compile_re2("(?:" + "|".join(p for p in prefixes if p) + r")\z") if rules else None

    def search(self, text: bytes, pos: int) -> Match | None:
        while self.combined is not None and pos <= len(text):
            hit = re2_span(self.combined, text, pos)
            if hit is None:
                return None
            start, end = hit
            if end > start:
                k = self._which(text, start, end)
                return Match(start, end, self.rules[k].name, self.replacements[k])
            pos = start + 1
        return None

    def _which(self, text: bytes, start: int, end: int) -> int:
        if self.which is not None:
            hit = self.which.match(text, start, end)
            # The outermost group ending last is the rule's own: the others did not take part.
            k = self.group_of.get(hit.lastindex) if hit is not None else None
            if k is not None:
                return k
        # Leftmost-first: the first rule that matches here is the one the combined search took.
        return next((k for k, regex in enumerate(self.compiled) if regex.match(text, start) is not None), 0)

    def viable(self, text: bytes, pos: int) -> int:
        if self.tail is None:
            return len(text)
        if self.hold_all:
            return pos
        hit = re2_span(self.tail, text, pos)
        return hit[0] if hit is not None else len(text)


@functools.lru_cache(maxsize=64)
def rule_set(rules: tuple[Rule, ...]) -> RuleSet:
    return RuleSet(rules)


class Masker:
    """Whole-text masking with a rule set and, optionally, a system prompt's runs."""

    def __init__(self, rules: RuleSet, prompt: PromptRuns | None = None) -> None:
        self.rules = rules
        self.prompt = prompt
        # The last answer of each finder: a leftmost search from further on in the same text gives
        # the same answer while it lies ahead, and asking again would rescan the text to its end.
        self._last: list[tuple[bytes, int, Match | None] | None] = [None, None]

    def _find(self, slot: int, finder: Callable[[bytes, int], Match | None], text: bytes, pos: int) -> Match | None:
        last = self._last[slot]
        if last is not None and last[0] is text and last[1] <= pos and (last[2] is None or last[2].start >= pos):
            return last[2]
        found = finder(text, pos)
        self._last[slot] = (text, pos, found)
        return found

    def next_match(self, text: bytes, pos: int) -> Match | None:
        """The leftmost match at or after `pos`; text before `pos` is context (`\\b`, `^`)."""
        found = self._find(0, self.rules.search, text, pos)
        if self.prompt is not None:
            run = self._find(1, self.prompt.search, text, pos)
            if run is not None and (found is None or run.start <= found.start):
                found = run
        return found

    def viable(self, text: bytes, pos: int) -> int:
        at = self.rules.viable(text, pos)
        if self.prompt is not None:
            at = min(at, self.prompt.viable(text, pos))
        return max(_char_floor(text, at), pos)

    def replacement(self, match: Match) -> bytes:
        return match.replacement

    def mask(self, text: str, counts: Counter[str] | None = None) -> str:
        return self.mask_bytes(text.encode(), counts).decode()

    def mask_bytes(self, data: bytes, counts: Counter[str] | None = None) -> bytes:
        """Masking of UTF-8 text; bytes that are not UTF-8 never match and are kept as they are."""
        out, pos = self.apply(data, 0, len(data), counts)
        return b"".join(out) + data[pos:]

    def apply(self, text: bytes, pos: int, stop: int, counts: Counter[str] | None) -> tuple[list[bytes], int]:
        """Replace the matches starting before `stop`; returns the pieces and where they end."""
        out: list[bytes] = []
        while True:
            m = self.next_match(text, pos)
            if m is None or m.start >= stop:
                return out, pos
            out.append(text[pos : m.start])
            out.append(self.replacement(m))
            if counts is not None:
                counts[m.name] += 1
            pos = m.end


# The most a stream masker holds back, in bytes.
MAX_HOLD = 64 * 1024


class StreamMasker:
    """Masks a text that arrives in pieces: `feed` returns what is final, `close` the rest."""

    def __init__(self, masker: Masker, counts: Counter[str]) -> None:
        self.masker = masker
        self.counts = counts
        self.pending = b""
        # The last character already sent, as context for `\b` and `^` at the start of `pending`.
        self.context = b""

    def feed(self, piece: str) -> str:
        if not piece:
            return ""
        text = self.context + self.pending + piece.encode()
        base = len(self.context)
        masker = self.masker
        hold = masker.viable(text, base)
        out: list[bytes] = []
        pos = base
        while hold > pos:
            m = masker.next_match(text, pos)
            if m is None or m.start >= hold:
                break
            if m.end >= len(text):
                # Cannot happen while prefix patterns cover their rules; never emit a growing match.
                hold = m.start
                break
            if m.end > hold:
                # A final match runs past the held tail: what may grow starts after it.
                hold = masker.viable(text, m.end)
            out.append(text[pos : m.start])
            out.append(masker.replacement(m))
            self.counts[m.name] += 1
            pos = m.end
        out.append(text[pos:hold])
        self.pending = text[hold:]
        self.context = text[_char_floor(text, hold - 1) : hold] if hold > 0 else b""
        if len(self.pending) > MAX_HOLD:
            # Only a run no real secret reaches ("sk-" and a megabyte of letters) gets here; rescanning
            # it for every delta would stall the reactor. Mask it as if the block ended here.
            out.append(self.close().encode())
        return b"".join(out).decode()

    def close(self) -> str:
        text = self.context + self.pending
        out, pos = self.masker.apply(text, len(self.context), len(text), self.counts)
        self.pending = b""
        self.context = text[_char_floor(text, len(text) - 1) :] if text else b""
        return (b"".join(out) + text[pos:]).decode()


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class JsonStringMasker:
    """Masks every string of a JSON text that arrives in pieces (streamed tool input).

    The strings are decoded (escapes included, even when split between pieces), masked by a
    StreamMasker each, and written back JSON-escaped; everything outside strings passes as it is.
    So a secret is found as the JSON value holds it (after a `\\n`, across a `\\u` escape) and the
    joined output is always valid JSON when the input was.
    """

    def __init__(self, new_masker: Callable[[], StreamMasker]) -> None:
        self.new_masker = new_masker
        self.string: StreamMasker | None = None
        self.escape = ""  # an escape sequence begun but not complete
        self.high = ""  # a high surrogate waiting for its low half

    def feed(self, piece: str) -> str:
        out: list[str] = []
        decoded: list[str] = []
        for ch in piece:
            if self.string is None:
                out.append(ch)
                if ch == '"':
                    self.string = self.new_masker()
            elif self.escape:
                self.escape += ch
                if self.escape[1] != "u" or len(self.escape) == 6:
                    decoded.append(self._unescape())
            elif ch == "\\":
                self.escape = ch
            elif ch == '"':
                out.append(self._end(decoded))
                decoded = []
                out.append(ch)
            else:
                decoded.append(self._pending_high() + ch)
        if self.string is not None and decoded:
            out.append(_json_text(self.string.feed("".join(decoded))))
        return "".join(out)

    def close(self) -> str:
        if self.string is None:
            return ""
        # The JSON stopped inside a string: send what was held, masked; drop a half escape.
        return self._end([])

    def _end(self, decoded: list[str]) -> str:
        assert self.string is not None
        decoded.append(self._pending_high())
        self.escape = ""
        text = self.string.feed("".join(decoded)) + self.string.close()
        self.string = None
        return _json_text(text)

    def _unescape(self) -> str:
        sequence, self.escape = self.escape, ""
        if sequence[1] != "u":
            return self._pending_high() + _ESCAPES.get(sequence[1], "\ufffd")
        try:
            unit = chr(int(sequence[2:], 16))
        except ValueError:
            return self._pending_high() + "\ufffd"
        if "\ud800" <= unit <= "\udbff":
            held, self.high = self._pending_high(), unit
            return held
        if "\udc00" <= unit <= "\udfff":
            if self.high:
                pair = (self.high + unit).encode("utf-16", "surrogatepass").decode("utf-16")
                self.high = ""
                return pair
            return "\ufffd"
        return self._pending_high() + unit

    def _pending_high(self) -> str:
        # A high surrogate not followed by its low half is not a character: it becomes U+FFFD.
        if not self.high:
            return ""
        self.high = ""
        return "\ufffd"


def _json_text(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


def built_in_rules(api_keys: bool, emails: bool, phones: bool) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for on, group in ((api_keys, API_KEY_RULES), (emails, EMAIL_RULES), (phones, PHONE_RULES)):
        if on:
            rules.extend(group)
    return tuple(rules)


def mask_strings(value: object, masker: Masker, counts: Counter[str]) -> object:
    """Every string inside a JSON value (tool input), masked in place; keys are left as they are.

    A loop over an explicit stack, not recursion: an upstream's JSON may nest deeper than Python's
    recursion limit allows a recursive walk.
    """
    if isinstance(value, str):
        return masker.mask(value, counts)
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            entries: Iterable[tuple[Any, object]] = enumerate(node)
        elif isinstance(node, dict):
            entries = node.items()
        else:
            continue
        for key, item in list(entries):
            if isinstance(item, str):
                node[key] = masker.mask(item, counts)
            elif isinstance(item, list | dict):
                stack.append(item)
    return value


def join_texts(parts: Iterable[str]) -> str:
    # A character no model text carries keeps prompt pieces from joining into false runs.
    return "\x00".join(p for p in parts if p)
