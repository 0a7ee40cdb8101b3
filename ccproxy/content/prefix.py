"""From a pattern, the pattern of everything a match could still begin with.

A stream masker may emit text only once no match can start there and run on into text not yet
received. For a pattern R, `prefix_pattern(R)` builds an RE2 pattern P whose language contains every
prefix of every string R matches (a superset: anchors and word boundaries are dropped, which can
only make P match more). Searching `(?:P)\\z` over the unsent text gives the earliest position from
which the tail might still grow into a match: only that tail is held back.

The syntax tree comes from Python's own regular-expression parser, which reads the RE2 syntax we
accept. Constructs it reads differently from RE2 (POSIX classes, `\\p{..}`, `\\Q..\\E`, `\\C`, `(?U)`)
give None: the caller then holds a whole content block back for that rule, which is safe but slow.
"""

from __future__ import annotations

import re
from re import _constants as C  # type: ignore[attr-defined]
from re import _parser as P  # type: ignore[attr-defined]
from typing import Any

# RE2 syntax Python's parser reads with another meaning, or not at all (`{,n}` is literal in RE2).
_RE2_ONLY = re.compile(r"\[:\^?[a-z]+:\]|\\[pPQECz]|\(\?[a-zA-Z]*U|\{,")
# RE2 refuses counted repetition above this.
_RE2_MAX_REPEAT = 1000

_FLAGS = ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"))
_CATEGORIES = {
    C.CATEGORY_DIGIT: r"\d",
    C.CATEGORY_NOT_DIGIT: r"\D",
    C.CATEGORY_SPACE: r"\s",
    C.CATEGORY_NOT_SPACE: r"\S",
    C.CATEGORY_WORD: r"\w",
    C.CATEGORY_NOT_WORD: r"\W",
}
_REPEATS = (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", C.MAX_REPEAT))


class _Unsupported(Exception):
    pass


def prefix_pattern(pattern: str) -> str | None:
    """An RE2 pattern matching every prefix of every match of `pattern`; None if not derivable."""
    if _RE2_ONLY.search(pattern):
        return None
    try:
        tree = P.parse(pattern)
        body = _prefix_seq(list(tree))
    except (_Unsupported, re.error, RecursionError, TypeError, ValueError):
        return None
    flags = _flag_letters(tree.state.flags)
    return f"(?{flags}:{body})" if flags else f"(?:{body})"


def min_width(pattern: str) -> int | None:
    """The fewest characters `pattern` can match, when Python's parser can tell."""
    if _RE2_ONLY.search(pattern):
        return None
    try:
        return int(P.parse(pattern).getwidth()[0])
    except (re.error, RecursionError, TypeError, ValueError, OverflowError):
        return None


def _flag_letters(flags: int) -> str:
    return "".join(letter for bit, letter in _FLAGS if flags & bit)


def _char(code: int) -> str:
    return chr(code) if chr(code).isalnum() and code < 128 else f"\\x{{{code:x}}}"


def _full_seq(items: list[Any]) -> str:
    return "".join(_full(op, av) for op, av in items)


def _full(op: Any, av: Any) -> str:
    """One node, serialised for RE2 with assertions dropped (a superset of its language)."""
    if op is C.LITERAL:
        return _char(av)
    if op is C.NOT_LITERAL:
        return f"[^{_char(av)}]"
    if op is C.ANY:
        return "."
    if op is C.IN:
        return _charset(av)
    if op is C.AT:
        return ""
    if op is C.BRANCH:
        return "(?:" + "|".join(_full_seq(list(b)) for b in av[1]) + ")"
    if op is C.SUBPATTERN:
        _group, add, remove, sub = av
        return _scoped(add, remove, _full_seq(list(sub)))
    if op in _REPEATS:
        low, high, sub = av
        return f"(?:{_full_seq(list(sub))}){_count(low, high)}"
    raise _Unsupported(str(op))


def _prefix_seq(items: list[Any]) -> str:
    """Every prefix of a match of the sequence `items`: P(x1) | F(x1) P(rest)."""
    if not items:
        return ""
    (op, av), rest = items[0], items[1:]
    head = _prefix(op, av)
    if not rest:
        return head
    return f"(?:{head}|{_full(op, av)}{_prefix_seq(rest)})"


def _prefix(op: Any, av: Any) -> str:
    """Every prefix (the empty one included) of a match of one node."""
    if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
        return f"(?:{_full(op, av)})?"
    if op is C.AT:
        return ""
    if op is C.BRANCH:
        return "(?:" + "|".join(_prefix_seq(list(b)) for b in av[1]) + ")"
    if op is C.SUBPATTERN:
        _group, add, remove, sub = av
        return _scoped(add, remove, _prefix_seq(list(sub)))
    if op in _REPEATS:
        _low, high, sub = av
        if high == 0:
            return ""
        inner = list(sub)
        more = "*" if high is C.MAXREPEAT or high - 1 > _RE2_MAX_REPEAT else f"{{0,{high - 1}}}"
        return f"(?:(?:{_full_seq(inner)}){more}{_prefix_seq(inner)})"
    raise _Unsupported(str(op))


def _count(low: int, high: Any) -> str:
    if high is C.MAXREPEAT or high > _RE2_MAX_REPEAT:
        return f"{{{min(low, _RE2_MAX_REPEAT)},}}"
    return f"{{{low},{high}}}"


def _scoped(add: int, remove: int, body: str) -> str:
    on, off = _flag_letters(add), _flag_letters(remove)
    if not on and not off:
        return f"(?:{body})"
    return f"(?{on}{'-' + off if off else ''}:{body})"


def _charset(items: list[Any]) -> str:
    parts: list[str] = []
    for op, av in items:
        if op is C.NEGATE:
            parts.insert(0, "^")
        elif op is C.LITERAL:
            parts.append(_char(av))
        elif op is C.RANGE:
            parts.append(f"{_char(av[0])}-{_char(av[1])}")
        elif op is C.CATEGORY:
            if av not in _CATEGORIES:
                raise _Unsupported(str(av))
            parts.append(_CATEGORIES[av])
        else:
            raise _Unsupported(str(op))
    return "[" + "".join(parts) + "]"
