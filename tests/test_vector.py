"""The vectorised triage (``triage_table``, Arrow/RE2) against the row-wise reference
(``triage_records``): the same verdicts, reasons, categories and columns on every row — on the real
HH-RLHF and PKU-SafeRLHF files and on generated rows that cover every rule kind, flag and edge case.
Both paths are run; neither result is written down by hand."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest

from conftest import ROOT
from trace_ray.data.readers import READ_SCHEMA, iter_records
from trace_ray.policy import load_policy
from trace_ray.triage import triage_records, triage_table

HH_POLICY = ROOT / "configs/policies/hh_harmless_v2.yaml"
PKU_POLICY = ROOT / "configs/policies/pku_harm_v2.yaml"


def both_paths(policy, records, batch=700):
    """(row-wise rows, vectorised rows) of the same canonical records."""
    want = triage_records(policy, records)
    table = pa.Table.from_pylist(records, schema=READ_SCHEMA)
    got = []
    for s in range(0, len(records), batch):
        got += triage_table(policy, table.slice(s, batch)).to_pylist()
    return want, got


def assert_same(want, got):
    assert len(want) == len(got)
    bad = [(w, g) for w, g in zip(want, got) if w != g]
    assert not bad, {k: (bad[0][0][k], bad[0][1][k]) for k in bad[0][0] if bad[0][0][k] != bad[0][1][k]}


@pytest.mark.parametrize("data,policy,fmt", [
    ("hh", HH_POLICY, "hh"), ("pku", PKU_POLICY, "pku"), ("hh", PKU_POLICY, "hh"), ("pku", HH_POLICY, "pku"),
])
def test_real_files(data, policy, fmt, hh_path, pku_path):
    records = list(iter_records(hh_path if data == "hh" else pku_path, fmt))
    want, got = both_paths(load_policy(policy), records)
    assert_same(want, got)
    cats = {r["category"] for r in got}
    assert cats >= ({"unresolved"} if policy == PKU_POLICY and data == "hh" else {"retain", "invert", "punish"})


# ------------------------------------------------------------------------------------ generated
TOKENS = ["gun", "GUN", "Gun", "guns", "begun", "gun-shy", "c++", "C++", "über", "ÜBER", "Straße", "STRASSE",
          "ſteal", "steal", "\u212aill", "kill", "café", "naïve", "’", "“quoted”", "\u00a0", "\t", "\n", "\n\n",
          "1. ", "2) ", "Step 3. do", "step 4 ", "first, you", "First get", "then", "next", "é", "日本語", "٣",
          "aaaa", "ab", "abab", "xyz", "hello", "world", "\u0301", "Ⓐ", "İ", "ı", ".", ",", "!", " ", " ", " "]

EDGE_POLICY = {
    "name": "edge", "version": "1", "description": "every rule kind", "mode": "any",
    "rules": [
        {"name": "kw", "kind": "keywords", "keywords": ["gun", "c++", "über", "straße", "kill", "steal"]},
        {"name": "kw_case", "kind": "keywords", "keywords": ["Gun", "GUN"], "case_sensitive": True},
        {"name": "steps", "kind": "regex", "patterns": [r"(?m)^\s*(?:step\s*)?[1-9][.)]\s+\w",
                                                        r"\bfirst,?\s+(?:you|get)\b.{0,40}?\b(?:then|next)\b"],
         "flags": ["IGNORECASE", "DOTALL"]},
        {"name": "ends", "kind": "regex", "pattern": r"world$"},
        {"name": "inner", "kind": "regex", "pattern": r"\Bing\b|x(?=yz)"},
        {"name": "verbose", "kind": "regex", "pattern": r"na \u00efve  # a comment", "flags": ["VERBOSE"]},
        {"name": "long", "kind": "regex", "pattern": r"hello.{0,1500}world", "flags": ["DOTALL"]},
        {"name": "backref", "kind": "regex", "pattern": r"(ab)\1"},
        {"name": "evil", "kind": "regex", "pattern": r"(a|aa)+$", "timeout_s": 0.05},
        {"name": "unicode_prop", "kind": "regex", "pattern": r"\p{Han}+"},
        {"name": "on_prompt", "kind": "keywords", "keywords": ["xyz"], "target": "prompt"},
        {"name": "harm", "kind": "meta", "harm_category": ["Violence", "Drugs"], "severity_at_least": 2},
        {"name": "unsafe", "kind": "meta", "is_safe": False},
        {"name": "src", "kind": "meta", "equals": {"source": "x"}},
        {"name": "custom", "kind": "callable", "function": "test_vector:custom_rule"},
    ],
}

def custom_rule(prompt, response, meta):
    """A callable rule for these tests: raises on one character, matches hello … world."""
    if "Ⓐ" in response:
        raise ValueError("unexpected character")
    return "hello" in response and "world" in response


METAS = [
    {"harm_category": ["Drugs"], "severity": 2, "is_safe": False, "source": "x"},
    {"harm_category": ["Drugs"], "severity": 1, "is_safe": True},
    {"harm_category": [], "severity": 3, "is_safe": True, "source": "y"},
    {"harm_category": ["Violence"], "severity": 2.5, "is_safe": False},
    {},
    {"harm_category": None, "severity": None, "is_safe": None},
    {"harm_category": 3, "severity": 2, "is_safe": True, "source": "y"},           # a number, not a list
    {"harm_category": "Violence", "severity": 2, "is_safe": True, "source": "y"},  # a string, not a list
    {"harm_category": ["Violence"], "severity": "high", "is_safe": True, "source": "y"},
    {"harm_category": ["Violence"], "severity": True, "is_safe": True, "source": "y"},
    {"harm_category": [], "severity": 2, "is_safe": "false", "source": "y"},  # read as true before
    {"harm_category": ["Drugs", 7], "severity": 2, "is_safe": 0},
]


def generated(n: int, seed: int, tokens=TOKENS, metas=METAS) -> list[dict]:
    """Canonical records via the real reader (JSON lines → iter_records), with bad rows mixed in."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(rng.choice(tokens) + rng.choice(["", " "]) for _ in range(rng.randint(0, k)))

    rows = []
    for i in range(n):
        row = {"prompt": text(4), "chosen": text(7) or "x", "rejected": text(7) or "y"}
        if rng.random() < 0.15:  # a conversation: rules read its last user turn
            row["prompt"] = [{"role": "user", "content": text(3)}, {"role": "assistant", "content": text(3)},
                             {"role": "user", "content": text(3)}]
        r = rng.random()
        if r < 0.03:
            row["chosen"] = rng.choice(["", "   ", "\n\t", "\u00a0"])  # blank → unresolved
        elif r < 0.04:
            row["rejected"] = "a" * 3000 + "!"  # the catastrophic pattern's hostile input
        elif r < 0.06:
            del row["rejected"]
        if rng.random() < 0.7:
            row["meta"] = {"chosen": rng.choice(metas), "rejected": rng.choice(metas)}
        rows.append(row)
    return rows


def _records(rows, tmp_path, name="edge.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return list(iter_records(path, "pairs"))


def test_generated_edge_cases(tmp_path):
    policy = load_policy(EDGE_POLICY)
    engines = {k: v["engine"] for k, v in policy.engines.items()}
    assert engines == {"kw": "re2", "kw_case": "re2", "steps": "re2", "ends": "re2", "inner": "re2", "verbose": "re2",
                       "long": "re2", "backref": "regex", "evil": "regex", "unicode_prop": "regex", "on_prompt": "re2",
                       "harm": "arrow", "unsafe": "arrow", "src": "arrow", "custom": "python"}
    assert policy.engines["steps"]["exactness"] == "ascii_words" and policy.engines["inner"]["exactness"] == "superset"
    assert "catastrophic" in policy.engines["evil"]["note"]
    # well-typed metadata (decided on Arrow columns) and batches with mistyped values (row-wise)
    assert_same(*both_paths(policy, _records(generated(700, seed=4, metas=METAS[:6] + [{"severity": float("nan")}]),
                                             tmp_path, "clean.jsonl")))
    records = _records(generated(1500, seed=1), tmp_path)
    want, got = both_paths(policy, records)
    assert_same(want, got)
    reasons = " ".join(r["reasons"] for r in got)
    for needle in ("kw: keyword", "kw_case:", "steps: matched", "ends: matched", "inner: matched", "backref: matched",
                   "harm: harm_category", "unsafe: is_safe=False", "src: source='x'",
                   "custom: test_vector:custom_rule raised ValueError", "on_prompt: keyword", "unicode_prop: matched", "not a list of categories",
                   "not a number", "'is_safe' is 'false', not true or false", "response metadata has no",
                   "empty response", "missing field"):
        assert needle in reasons, needle


def test_time_bound_errors_are_the_same_on_both_paths():
    """A pattern that can backtrack catastrophically stays on the regex engine: both paths give
    the response an error verdict after its time bound, and a match elsewhere still decides."""
    policy = load_policy({"name": "t", "version": 1, "rules": [
        {"name": "evil", "kind": "regex", "pattern": r"(a|aa)+$", "timeout_s": 0.05},
        {"name": "kw", "kind": "keywords", "keywords": ["zzz"]}]})
    hostile = "a" * 20000 + "!"
    records = [{"id": str(i), "prompt": "p", "chosen": c, "rejected": "fine", "meta": "{}", "_error": None}
               for i, c in enumerate([hostile, hostile + " zzz", "aaa"])]
    want, got = both_paths(policy, records)
    assert_same(want, got)
    assert [r["chosen_verdict"] for r in got] == ["error", "non_compliant", "non_compliant"]
    assert json.loads(got[0]["reasons"])["chosen"] == ["evil: regex timed out after 0.05s"]


def test_mostly_non_english_batch_uses_the_unicode_patterns(tmp_path):
    """Rows holding non-ASCII word characters are decided by the exact Unicode classes (their
    match text found row by row), and only a ``\\b`` rule's candidates among them go row-wise."""
    tokens = ["über", "Straße", "café", "naïve", "gun", "日本語", "first, you", "then", "1. ", "kill", "\u212aILL", " "]
    policy = load_policy(EDGE_POLICY)
    records = _records(generated(600, seed=2, tokens=tokens), tmp_path)
    from trace_ray.policy.re2 import non_ascii_word_class
    import pyarrow.compute as pc

    naw = pc.match_substring_regex(pa.array([r["chosen"] for r in records]), non_ascii_word_class())
    assert pc.mean(naw.cast("int8")).as_py() > 0.5
    assert_same(*both_paths(policy, records))


def test_a_text_the_set_gives_up_on_is_decided_row_wise(monkeypatch, hh_path):
    """RE2's set answers nothing, not even its sentinel, when its DFA runs out of memory: such
    texts (here every third one, forced) get the reference's verdicts and reasons."""
    from trace_ray.policy import vector

    policy = load_policy(HH_POLICY)
    records = list(iter_records(hh_path, "hh"))[:600]
    real = vector.compiled_set
    calls = []

    class GivesUp:  # the binding under the set (``_set``): a list of indices, empty when the DFA gave up
        def __init__(self, binding):
            self._set, self.binding = self, binding

        def Match(self, text):
            calls.append(1)
            return [] if len(calls) % 3 == 0 else self.binding.Match(text)

    monkeypatch.setattr(vector, "compiled_set", lambda patterns: GivesUp(real(patterns)._set))
    want, got = both_paths(policy, records)
    assert len(calls) >= 1000  # both responses of (nearly) every row went through the set
    assert_same(want, got)
    assert {r["category"] for r in got} >= {"retain", "invert", "punish"}


def test_rules_that_do_not_fit_one_set_run_on_the_regex_engine(monkeypatch, hh_path):
    """Each pattern compiles, but the policy's RE2 rules together exceed the set's memory budget:
    they are planned on the ``regex`` engine (exact), and the note says why."""
    from trace_ray.policy import vector

    monkeypatch.setattr(vector, "SET_MAX_MEM", 512 << 10)  # enough for each pattern, not for all of them
    vector.compiled_set.cache_clear()
    try:
        policy = load_policy(HH_POLICY)
    finally:
        vector.compiled_set.cache_clear()
    assert {k: v["engine"] for k, v in policy.engines.items()} == {r.name: "regex" for r in policy.rules}
    assert all("do not fit one RE2 set" in v["note"] for v in policy.engines.values())
    assert_same(*both_paths(policy, list(iter_records(hh_path, "hh"))[:300]))


def test_mode_all_and_judge_answers():
    from trace_ray.policy.vector import Side, check_columns

    policy = load_policy({"name": "a", "version": 1, "mode": "all", "rules": [
        {"name": "kw", "kind": "keywords", "keywords": ["gun"]},
        {"name": "sev", "kind": "meta", "severity_at_least": 2},
        {"name": "j", "kind": "judge", "model": "pypi:smollm2"},
    ]})
    rng = random.Random(3)
    n = 400
    prompts = ["p"] * n
    responses = [rng.choice(["a gun", "no", "GUN!", ""]) for _ in range(n)]
    metas = [rng.choice([{"severity": 3}, {"severity": 1}, {}, {"severity": "x"}]) for _ in range(n)]
    answers = [rng.choice(["yes", "No.", "maybe", None]) for _ in range(n)]
    want = policy.check(prompts, responses, metas, answers)
    import numpy as np

    meta_json = pa.array([json.dumps({"chosen": m}) for m in metas])
    from trace_ray.policy.vector import meta_fields, parse_side_meta, side_meta_rows

    parsed = parse_side_meta(meta_json, meta_fields(policy))
    side = Side(pa.array(prompts), pa.array(responses), np.ones(n, dtype=bool),
                None if parsed is None else parsed["chosen"], side_meta_rows(meta_json, "chosen"), answers)
    codes, reasons = check_columns(policy, side)
    names = ("compliant", "non_compliant", "error")
    assert [(names[c], reasons.get(i, [])) for i, c in enumerate(codes)] == [(v.verdict, v.reasons) for v in want]


def test_no_garbage_collection_runs_inside_a_batch(hh_path):
    """``triage_table`` pauses Python's cyclic collector (a full collection walks every object of
    a Ray worker) and restores it after: enabled stays enabled, disabled stays disabled; the
    rows are the same either way."""
    import gc
    import sys

    from trace_ray.triage import _triage_table

    policy = load_policy(HH_POLICY)
    table = pa.Table.from_pylist(list(iter_records(hh_path))[:1500], schema=READ_SCHEMA)
    inside: list[bool] = []  # per collection: did it start within the vectorised triage?

    def count(phase, info):
        if phase == "start":
            f = sys._getframe(1)
            while f is not None and f.f_code is not _triage_table.__code__:
                f = f.f_back
            inside.append(f is not None)

    old = gc.get_threshold()
    gc.callbacks.append(count)
    gc.set_threshold(50, *old[1:])  # a collection every 50 net allocations of containers
    try:
        want = _triage_table(policy, table)  # not paused: collections do start inside
        assert any(inside)
        inside.clear()
        assert triage_table(policy, table).equals(want) and gc.isenabled()
        assert not any(inside)
        gc.disable()
        assert triage_table(policy, table).equals(want) and not gc.isenabled()
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*old)
        gc.enable()
