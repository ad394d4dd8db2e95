"""Python ``regex`` patterns translated to RE2 (``trace_ray.policy.re2``), checked against the
``regex`` module itself: every code point for the character classes, and generated texts (with
Unicode, case folding, newlines, word boundaries) for whole patterns."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import regex

from trace_ray.policy.re2 import (
    Untranslatable,
    _all_chars,
    charset,
    non_ascii_word_class,
    re2_class,
    translate,
)
from trace_ray.policy.vector import SENTINEL, compiled_regex, compiled_set

PATTERNS = [
    (r"(?m)^\s*(?:step\s*)?[1-9][.)]\s+\w", regex.I | regex.S),
    (r"\bfirst,?\s+(?:you|get|find|take)\b.{0,200}?\b(?:then|next)\b", regex.I | regex.S),
    (r"(?<!\w)(?:guns|gun|knife|c\+\+)(?!\w)", regex.I),
    (r"(?<!\w)(?:Straße|über|KELVIN)(?!\w)", regex.I),
    (r"(?<!\w)(?:Gun)(?!\w)", 0),
    (r"a$", 0), (r"(?m)a$", 0), (r"(?m)^$", 0), (r"^a", 0), (r"\Aa|b\Z", 0),
    (r"\d+\.\d", 0), (r"[^a-z\s]+x", regex.I), (r"x.y", 0), (r"x.y", regex.S), (r"(?i:ab)C", 0),
    (r"a{2,3}?b", 0), (r"colou?r", 0), (r"\Bing\b", 0), (r"\W\w\S\s\D", 0), (r"k", regex.I),
    (r"ß", regex.I), (r"[ſ]", regex.I), (r"a b # comment\n c", regex.X), (r"(?=a)ab", 0),
    (r"x(?!y)z?", 0), (r"a++b", 0), (r"(?>ab|a)c", 0), (r"a{0,1500}b", 0), (r"", 0),
]
ALPHABET = list("aAbBkKsSxyzC019 _.\n\t-+c") + [
    "é", "ß", "ſ", "\u212a", "’", "\u00a0", "İ", "ı", "\u0301", "Ⓐ", "٣", "ü", "Ü", "\u0085", "\x0b", "\x1c",
    "step", "first", "you", "then", "gun", "GUN", "Gun", "guns", "c++", "über", "STRASSE", "ing", "1. ", "\n2) ",
]


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(0)
    return [''.join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 24))) for _ in range(12000)]


@pytest.fixture(scope="module")
def every_char():
    return pa.array(list(_all_chars()), pa.string())


@pytest.mark.parametrize("py", [r"\w", r"\W", r"\s", r"\S", r"\d", r"\D", ".", "[a-z]", "[^a-z]"])
@pytest.mark.parametrize("flags", [0, regex.I, regex.S])
def test_classes_equal_the_regex_module_on_every_code_point(py, flags, every_char):
    """RE2 (Arrow) with the emitted class matches exactly the code points the regex module does:
    all of them against the ranges, and a sample of them against ``regex.match`` directly."""
    import numpy as np

    ranges = charset(py, flags)
    got = pc.match_substring_regex(every_char, "^" + re2_class(ranges) + "$").to_numpy(zero_copy_only=False)
    want = np.zeros(len(got), dtype=bool)
    for lo, hi in ranges:  # code point → position: the surrogates are not in the array
        want[(lo if lo < 0xD800 else lo - 0x800):(hi if hi < 0xD800 else hi - 0x800) + 1] = True
    assert np.array_equal(got, want)
    direct = regex.compile(f"^(?:{py})$", flags)
    assert all(bool(direct.match(c)) == g for c, g in zip(_all_chars()[::211], got[::211]))


@pytest.mark.parametrize("pattern,flags", PATTERNS, ids=[repr(p)[:40] for p, _ in PATTERNS])
def test_translation_matches_the_regex_module(pattern, flags, texts):
    """Per text, with google-re2 as triage runs it: the set's verdict on the pattern and the match
    of group m equal regex's match (exact), or are one whenever regex has one (superset); the
    loose form matches wherever regex does. Texts with a non-ASCII word character are excluded
    where the translation uses RE2's ASCII \\b."""
    tr = translate(pattern, flags)
    has_naw = [bool(regex.search(r"(?![\x00-\x7f])\w", t)) for t in texts]
    cre = regex.compile(pattern, flags)
    want = [(m.group(0) if m else None) for m in map(cre.search, texts)]
    one_set, find = compiled_set((SENTINEL, tr.unicode, tr.loose_unicode)), compiled_regex(tr.unicode)
    naw_set = compiled_set((SENTINEL, non_ascii_word_class()))
    for i, (text, w) in enumerate(zip(texts, want)):
        found = one_set.Match(text.encode())
        assert found is not None and 0 in found  # the sentinel
        assert (1 in naw_set.Match(text.encode())) == has_naw[i], text
        if w is not None:
            assert 2 in found, text  # the loose form: a superset
        if tr.boundary and has_naw[i]:
            continue
        raw = text.encode()
        g = None if (span := find(raw)) is None else raw[span[0]: span[1]].decode()
        assert (1 in found) == (g is not None), text
        assert (w is None or g is not None) if tr.superset else g == w, ("google-re2", text, w, g)


def test_relaxations_are_reported():
    assert translate(r"(?=a)ab").superset and translate(r"a{0,1500}b").superset and translate(r"a++b").superset
    assert translate(r"\bx").boundary and not translate(r"\bx").superset
    assert not translate(r"(?<!\w)gun(?!\w)", regex.I).superset  # edge look-arounds are exact
    assert translate(r"x$").exactness == "exact" and translate(r"x$y?").exactness == "superset"


@pytest.mark.parametrize("pattern,why", [
    (r"(a)\1", "back-references"),
    (r"(a|aa)+$", "catastrophic"),
    (r"(?:\w+\s?)+x", "catastrophic"),
    (r"\p{L}+", "re parser rejects"),
    (r"(?(1)a|b)", "re parser rejects|back-references"),
])
def test_untranslatable_patterns_say_why(pattern, why):
    with pytest.raises(Untranslatable, match=why):
        translate(pattern)
