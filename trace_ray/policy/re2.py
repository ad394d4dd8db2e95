"""Python ``regex`` patterns → RE2 patterns with the same matches.

A rule's meaning is the ``regex`` module's (the row-wise path, ``rules.decide``). The vectorised
path (``trace_ray.policy.vector``) runs RE2 instead (google-re2: one RE2 set over every text,
then the match text on the rows that hit), so a pattern is translated here into RE2 syntax with
the SAME matches. How equality is kept:

- **Characters.** Every single-character item (a literal, a class ``[...]``, ``.``, ``\w`` ...,
  under the case-insensitive and dot-all flags in force) becomes an explicit RE2 class of
  code-point ranges computed by running the ``regex`` module itself over every code point
  (:func:`charset`): Unicode ``\w``/``\s``/``\d`` and case folding are the ``regex`` module's by
  construction, whatever RE2's own tables say.
- **Structure.** Sequences, alternation (same order), groups, greedy and lazy repetition map one to
  one, so RE2's leftmost-first match is the match the ``regex`` module finds: the named group ``m``
  spans exactly the row-wise ``m.group(0)``.
- **Zero-width items** RE2 lacks are rewritten where that is exact: a one-character look-behind at
  the very start of the pattern becomes a consumed ``(?:\A|[^S])`` outside ``m`` (a look-ahead at
  the end likewise), a non-multiline ``$`` at the end becomes ``\n?\z``. ``\b``/``\B`` use RE2's
  ASCII word boundary, equal to the ``regex`` module's on every text without a non-ASCII word
  character (``Translation.boundary``). Anything else (a look-around elsewhere, ``$`` mid-pattern,
  atomic groups, possessive or over-long repetition) is relaxed to something that matches MORE
  (``Translation.superset``): RE2's hits are then only candidates, confirmed row-wise.

Each pattern comes two ways (:class:`Translation`): exact, with the group ``m``, and *loose* (no
group, ``\\b`` dropped: a superset, which tells where a ``\\b`` rule may match a text whose word
characters RE2's ASCII ``\\b`` does not know).

Patterns RE2 cannot express (back-references, conditionals, ``\p{..}``, anything Python's own
``re`` parser rejects) raise :class:`Untranslatable`, and so do the shapes that make a
backtracking engine explode (an unbounded repetition of something that itself repeats or
alternates, e.g. ``(a|aa)+``): those rules stay on the ``regex`` module with its time bound, so
both paths give the same ``error`` verdict when it runs out.

Imports: the standard library and ``regex``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import regex

try:  # Python's own regex parser (3.11+: re._parser; older: sre_parse)
    import re._constants as _c
    import re._parser as _parser
except ImportError:  # pragma: no cover
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _parser  # type: ignore[no-redef]

RE2_MAX_REPEAT = 1000  # RE2 rejects counted repetition above this
_MAXREPEAT = _c.MAXREPEAT
_SINGLE = (_c.LITERAL, _c.NOT_LITERAL, _c.IN, _c.ANY)
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT) + ((_c.POSSESSIVE_REPEAT,) if hasattr(_c, "POSSESSIVE_REPEAT") else ())
_CATEGORIES = {
    _c.CATEGORY_DIGIT: r"\d", _c.CATEGORY_NOT_DIGIT: r"\D", _c.CATEGORY_SPACE: r"\s",
    _c.CATEGORY_NOT_SPACE: r"\S", _c.CATEGORY_WORD: r"\w", _c.CATEGORY_NOT_WORD: r"\W",
}


class Untranslatable(ValueError):
    """The pattern stays on the ``regex`` module; the message says why."""


@dataclass(frozen=True)
class Translation:
    """One pattern in RE2 syntax, two ways:

    - ``unicode``: exact Unicode classes, the group ``m`` spanning the ``regex`` module's match —
      equal to ``regex`` on every text (when neither flag below);
    - ``loose_unicode``: no group, ``\\b``/``\\B`` dropped — matches a superset of every text's.

    ``boundary``: uses ``\\b``/``\\B`` (RE2's are ASCII: equal to ``regex``'s only on texts without a
    non-ASCII word character). ``superset``: something was relaxed; RE2 hits must be confirmed.
    """

    unicode: str
    loose_unicode: str
    boundary: bool
    superset: bool

    @property
    def exactness(self) -> str:
        return "superset" if self.superset else "ascii_words" if self.boundary else "exact"


# ---------------------------------------------------------------------------------------------
# single characters: exact code-point sets from the regex module itself


@functools.lru_cache(maxsize=1)
def _all_chars() -> str:
    """Every code point except the surrogates (which valid UTF-8 text cannot hold)."""
    return "".join(map(chr, range(0xD800))) + "".join(map(chr, range(0xE000, 0x110000)))


def _cp(pos: int) -> int:
    return pos if pos < 0xD800 else pos + 0x800


@functools.lru_cache(maxsize=4096)
def charset(py_class: str, flags: int = 0) -> tuple[tuple[int, int], ...]:
    """Code-point ranges ``((lo, hi), ...)`` that the ``regex`` module's one-character pattern
    ``py_class`` matches under ``flags`` (``regex.IGNORECASE`` / ``DOTALL`` / ``ASCII``)."""
    out: list[tuple[int, int]] = []
    for m in regex.finditer(f"(?:{py_class})+", _all_chars(), flags):
        lo, hi = m.start(), m.end() - 1
        if lo < 0xD800 <= hi:  # a run across the surrogate gap is two ranges
            out += [(lo, 0xD7FF), (0xE000, _cp(hi))]
        else:
            out.append((_cp(lo), _cp(hi)))
    return tuple(out)


def _hex(c: int) -> str:
    """One code point in RE2 syntax (inside or outside a class)."""
    return chr(c) if chr(c).isascii() and chr(c).isalnum() else f"\\x{{{c:X}}}"


def re2_class(ranges: tuple[tuple[int, int], ...]) -> str:
    """An RE2 class matching exactly these code points."""
    if not ranges:
        return r"[^\x00-\x{10FFFF}]"  # matches nothing
    if ranges == ((0, 0xD7FF), (0xE000, 0x10FFFF)):
        return r"(?s:.)"
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return _hex(ranges[0][0])
    body = "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)
    return f"[{body}]"


@functools.lru_cache(maxsize=1)
def non_ascii_word() -> tuple[tuple[int, int], ...]:
    """Code points the ``regex`` module counts as ``\\w`` that are not ASCII."""
    return tuple((max(lo, 0x80), hi) for lo, hi in charset(r"\w") if hi >= 0x80)


@functools.lru_cache(maxsize=1)
def non_ascii_word_class() -> str:
    """RE2 class of :func:`non_ascii_word`: a text holding none of them has the same word
    characters (and word boundaries) under RE2's ASCII rules and under ``regex``."""
    return re2_class(non_ascii_word())


def complement(ranges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The code points (surrogates excluded) not in ``ranges``."""
    out, at = [], 0
    for lo, hi in list(ranges) + [(0x110000, 0x110000)]:
        for a, b in ((at, min(lo - 1, 0xD7FF)), (max(at, 0xE000), lo - 1)):
            if a <= b:
                out.append((a, b))
        at = hi + 1
    return tuple(out)


def _regex_flags(flags: int) -> int:
    f = 0
    if flags & _c.SRE_FLAG_IGNORECASE:
        f |= regex.IGNORECASE
    if flags & _c.SRE_FLAG_DOTALL:
        f |= regex.DOTALL
    if flags & _c.SRE_FLAG_ASCII:
        f |= regex.ASCII
    return f


def _py_class(op, av) -> str:
    """One single-character node → a ``regex``-syntax pattern of one character."""
    if op == _c.ANY:
        return "."
    if op == _c.LITERAL:
        return f"[\\U{av:08X}]"
    if op == _c.NOT_LITERAL:
        return f"[^\\U{av:08X}]"
    parts = []
    for iop, iav in av:  # IN
        if iop == _c.NEGATE:
            parts.insert(0, "^")
        elif iop == _c.LITERAL:
            parts.append(f"\\U{iav:08X}")
        elif iop == _c.RANGE:
            parts.append(f"\\U{iav[0]:08X}-\\U{iav[1]:08X}")
        elif iop == _c.CATEGORY and iav in _CATEGORIES:
            parts.append(_CATEGORIES[iav])
        else:
            raise Untranslatable(f"class item {iop} is not supported")
    return "[" + "".join(parts) + "]"


def _single(node, flags: int) -> tuple[tuple[int, int], ...]:
    op, av = node
    return charset(_py_class(op, av), _regex_flags(flags))


# ---------------------------------------------------------------------------------------------
# structure


def _children(op, av) -> list:
    """The sub-sequences of one parse-tree node."""
    if op == _c.BRANCH:
        return list(av[1])
    if op == _c.SUBPATTERN:
        return [av[-1]]
    if op in _REPEATS:
        return [av[2]]
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return [av[1]]
    if op == getattr(_c, "ATOMIC_GROUP", None):
        return [av]
    if op == _c.GROUPREF_EXISTS:
        return [alt for alt in av[1:] if alt is not None]
    return []


def _walk(seq):
    for op, av in seq:
        yield op, av
        for child in _children(op, av):
            yield from _walk(child)


def _risky(seq, under_unbounded: bool = False) -> bool:
    """An unbounded repetition whose body repeats or alternates: exponential for a backtracker."""
    for op, av in seq:
        if op in _REPEATS:
            _lo, hi, body = av
            if under_unbounded and hi > 1:
                return True
            if _risky(body, under_unbounded or hi == _MAXREPEAT):
                return True
        elif op == _c.BRANCH and under_unbounded:
            return True
        elif any(_risky(child, under_unbounded) for child in _children(op, av)):
            return True
    return False


class _Emitter:
    """Parse tree → RE2 text. ``loose``: ``\\b``/``\\B`` dropped and no group ``m`` (a superset).
    Records whether ``\\b`` was used and whether anything was relaxed to a superset."""

    def __init__(self, loose: bool):
        self.loose = loose
        self.boundary = self.superset = False

    def cls(self, ranges) -> str:
        return re2_class(ranges)

    def seq(self, seq, flags: int) -> str:
        return "".join(self.node(op, av, flags) for op, av in seq)

    def node(self, op, av, flags: int) -> str:
        if op in _SINGLE:
            if op == _c.LITERAL and not flags & _c.SRE_FLAG_IGNORECASE:
                return _hex(av)
            return self.cls(_single((op, av), flags))
        if op == _c.BRANCH:
            return "(?:" + "|".join(self.seq(alt, flags) for alt in av[1]) + ")"
        if op == _c.SUBPATTERN:
            _gid, add, remove, body = av
            return "(?:" + self.seq(body, (flags | add) & ~remove) + ")"
        if op in _REPEATS:
            lo, hi, body = av
            if op not in (_c.MAX_REPEAT, _c.MIN_REPEAT):
                self.superset = True  # possessive → plain: matches more
            if lo > RE2_MAX_REPEAT or (hi != _MAXREPEAT and hi > RE2_MAX_REPEAT):
                self.superset = True
                lo, hi = min(lo, RE2_MAX_REPEAT), _MAXREPEAT
            if hi == _MAXREPEAT:
                q = "*" if lo == 0 else "+" if lo == 1 else f"{{{lo},}}"
            else:
                q = f"{{{lo}}}" if lo == hi else "?" if (lo, hi) == (0, 1) else f"{{{lo},{hi}}}"
            return "(?:" + self.seq(body, flags) + ")" + q + ("?" if op == _c.MIN_REPEAT else "")
        if op == getattr(_c, "ATOMIC_GROUP", None):
            self.superset = True
            return "(?:" + self.seq(av, flags) + ")"
        if op == _c.AT:
            return self.anchor(av, flags)
        if op in (_c.ASSERT, _c.ASSERT_NOT):
            self.superset = True  # dropped: a look-around only ever removes matches
            return ""
        raise Untranslatable(f"{_name(op)} is not supported by RE2")

    def anchor(self, code, flags: int) -> str:
        multiline = bool(flags & _c.SRE_FLAG_MULTILINE)
        if code == _c.AT_BEGINNING:
            return "(?m:^)" if multiline else r"\A"
        if code == _c.AT_BEGINNING_STRING:
            return r"\A"
        if code == _c.AT_END:
            if not multiline:
                self.superset = True  # `$` = end or before a final newline; (?m:$) allows more
            return "(?m:$)"
        if code == _c.AT_END_STRING:
            return r"\z"
        if code in (_c.AT_BOUNDARY, _c.AT_NON_BOUNDARY):
            self.boundary = True
            return "" if self.loose else r"\b" if code == _c.AT_BOUNDARY else r"\B"
        raise Untranslatable(f"anchor {_name(code)} is not supported")

    def edge(self, node, flags: int, start: bool) -> str | None:
        """A one-character look-around at the start (look-behind) or end (look-ahead) of the
        pattern → the consumed RE2 equivalent; None when ``node`` is not one."""
        op, av = node
        if op not in (_c.ASSERT, _c.ASSERT_NOT):
            return None
        direction, body = av
        if (direction < 0) != start or len(body) != 1 or body[0][0] not in _SINGLE:
            return None
        ranges = _single(body[0], flags)
        if op == _c.ASSERT:
            return self.cls(ranges)
        other = self.cls(complement(ranges))
        return f"(?:\\A|{other})" if start else f"(?:{other}|\\z)"

    def pattern(self, tree) -> str:
        flags, items = tree.state.flags, list(tree)
        prefix = suffix = ""
        if items and (p := self.edge(items[0], flags, start=True)) is not None:
            prefix, items = p, items[1:]
        if items and (s := self.edge(items[-1], flags, start=False)) is not None:
            suffix, items = s, items[:-1]
        elif items and items[-1] == (_c.AT, _c.AT_END) and not flags & _c.SRE_FLAG_MULTILINE:
            suffix, items = r"\n?\z", items[:-1]
        body = self.seq(items, flags)
        return f"{prefix}(?:{body}){suffix}" if self.loose else f"{prefix}(?P<m>{body}){suffix}"


def _name(op) -> str:
    return str(getattr(op, "name", op)).lower()


def translate(pattern: str, flags: int = 0) -> Translation:
    """``pattern`` under ``flags`` (``re``/``regex`` flag bits: IGNORECASE, MULTILINE, DOTALL,
    VERBOSE) → :class:`Translation`; raises :class:`Untranslatable`."""
    try:
        tree = _parser.parse(pattern, flags)
    except (re.error, OverflowError, RecursionError) as e:
        raise Untranslatable(f"Python's re parser rejects it ({e})") from None
    if tree.state.flags & _c.SRE_FLAG_LOCALE:
        raise Untranslatable("LOCALE flag")
    if any(op in (_c.GROUPREF, _c.GROUPREF_EXISTS) for op, _ in _walk(tree)):
        raise Untranslatable("back-references and conditionals are not supported by RE2")
    if _risky(tree):
        raise Untranslatable("an unbounded repetition of a repetition or alternation "
                             "(catastrophic backtracking possible): kept on the regex engine and its time bound")
    out = {}
    for key, loose in (("unicode", False), ("loose_unicode", True)):
        em = _Emitter(loose)
        out[key] = em.pattern(tree)
    return Translation(**out, boundary=em.boundary, superset=em.superset)
