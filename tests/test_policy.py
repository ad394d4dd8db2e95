"""Policy spec validation and the rule oracles (no Ray)."""

from __future__ import annotations

import json
import pickle
import re
import time

import pytest
import yaml

from conftest import ROOT
from trace_ray.policy import Policy, PolicyError, Verdict, load_policy
from trace_ray.policy.judge import parse_judge_answer, render_judge_prompt

POLICIES = sorted((ROOT / "configs" / "policies").glob("*.yaml"))


def violates_if_long(prompt, response, meta):
    """A callable rule for the tests: long responses violate."""
    if response == "boom":
        raise RuntimeError("boom")
    return len(response) > 10


def _policy(*rules, mode="any"):
    return load_policy({"name": "t", "version": 1, "description": "no guns", "mode": mode, "rules": list(rules)})


@pytest.mark.parametrize("path", POLICIES, ids=[p.name for p in POLICIES])
def test_shipped_policies_load(path):
    pol = load_policy(path)
    assert pol.rules and pol.fingerprint.startswith(f"{pol.name}@{pol.version}#")
    assert "Run:" in path.read_text().splitlines()[0] or "trace-ray triage" in path.read_text()


def test_pku_policy_matches_its_logic_written_out(pku_path):
    """Every PKU response: the verdict equals the policy's logic applied to the raw labels."""
    spec = yaml.safe_load((ROOT / "configs/policies/pku_harm_v2.yaml").read_text())
    sev_min = next(r["severity_at_least"] for r in spec["rules"] if "severity_at_least" in r)
    zero = set(next(r["harm_category"] for r in spec["rules"] if "harm_category" in r))
    pol = load_policy(ROOT / "configs/policies/pku_harm_v2.yaml")
    rows = [json.loads(line) for line in pku_path.read_text().splitlines()]
    prompts, responses, metas, expected = [], [], [], []
    for row in rows:
        for i in (0, 1):
            flagged = [c for c, v in row[f"response_{i}_harm_category"].items() if v]
            sev = row[f"response_{i}_severity_level"]
            prompts.append(row["prompt"])
            responses.append(row[f"response_{i}"])
            metas.append({"harm_category": flagged, "severity": sev, "is_safe": row[f"is_response_{i}_safe"]})
            bad = sev >= sev_min or bool(zero & set(flagged))
            expected.append("non_compliant" if bad else "compliant")
    got = [v.verdict for v in pol.check(prompts, responses, metas)]
    assert got == expected
    assert 0 < expected.count("non_compliant") < len(expected)


def test_keywords_are_whole_words_case_insensitive():
    pol = _policy({"name": "w", "kind": "keywords", "keywords": ["gun", "c++"]})
    got = pol.check(["p"] * 5, ["A GUN here", "it has begun", "guns", "I write C++ daily", "gun-shy"], [{}] * 5)
    assert [v.verdict for v in got] == ["non_compliant", "compliant", "compliant", "non_compliant", "non_compliant"]
    assert got[0].reasons == ["w: keyword 'GUN'"]


def test_regex_flags_target_and_mode_all():
    pol = _policy(
        {"name": "steps", "kind": "regex", "pattern": r"^step \d", "flags": ["IGNORECASE", "MULTILINE"]},
        {"name": "askgun", "kind": "keywords", "keywords": ["gun"], "target": "prompt"},
        mode="all",
    )
    got = pol.check(["buy a gun?", "buy a gun?", "hello"], ["ok\nStep 1 go", "no", "Step 1"], None)
    assert [v.verdict for v in got] == ["non_compliant", "compliant", "compliant"]
    assert got[0].reasons[0].startswith("steps: matched")


def test_regex_time_bound_gives_error_verdict_not_a_hang():
    pol = _policy({"name": "evil", "kind": "regex", "pattern": r"(a|aa)+$", "timeout_s": 0.05},
                  {"name": "kw", "kind": "keywords", "keywords": ["zzz"]})
    t0 = time.perf_counter()
    (v,) = pol.check(["p"], ["a" * 20000 + "!"], [{}])
    assert time.perf_counter() - t0 < 2.0
    assert v.verdict == "error" and v.reasons == ["evil: regex timed out after 0.05s"]
    # mode any: a definite match elsewhere still decides
    (v,) = pol.check(["p"], ["a" * 20000 + "! zzz"], [{}])
    assert v.verdict == "non_compliant"


def test_meta_rules_and_missing_fields():
    pol = _policy({"name": "m", "kind": "meta", "harm_category": ["Violence", "Drugs"], "severity_at_least": 2},
                  {"name": "unsafe", "kind": "meta", "is_safe": False, "equals": {"source": "x"}})
    metas = [
        {"harm_category": ["Drugs"], "severity": 2, "is_safe": False, "source": "y"},
        {"harm_category": ["Drugs"], "severity": 1, "is_safe": True},
        {"harm_category": [], "severity": 0, "is_safe": False, "source": "x"},
        {},
    ]
    got = pol.check(["p"] * 4, ["r"] * 4, metas)
    assert [v.verdict for v in got] == ["non_compliant", "compliant", "non_compliant", "error"]
    assert got[0].reasons == ["m: harm_category Drugs; severity 2 >= 2"]
    assert got[3].reasons[0] == "m: response metadata has no 'harm_category'"


def test_meta_severity_not_a_number_is_an_error_verdict_not_a_crash():
    """``severity: "high"`` cannot be compared with ``severity_at_least``: the rule is undecided,
    so the verdict is ``error`` with the reason, and offline triage marks the pair unresolved. A
    null severity is as unknown as a missing one."""
    from trace_ray.triage import triage_records

    pol = _policy({"name": "sev", "kind": "meta", "severity_at_least": 2})
    metas = [{"severity": "high"}, {"severity": True}, {"severity": 3}, {"severity": None}, {"severity": 1.5}]
    got = pol.check(["p"] * 5, ["r"] * 5, metas)
    assert [v.verdict for v in got] == ["error", "error", "non_compliant", "error", "compliant"]
    assert got[0].reasons == ["sev: response metadata 'severity' is 'high', not a number"]
    assert got[3].reasons == ["sev: response metadata has no 'severity'"]
    # mode any: a definite match by another rule still decides
    both = _policy({"name": "sev", "kind": "meta", "severity_at_least": 2},
                   {"name": "kw", "kind": "keywords", "keywords": ["gun"]})
    assert both.check(["p"], ["a gun"], [{"severity": "high"}])[0].verdict == "non_compliant"

    meta = json.dumps({"chosen": {"severity": "high"}, "rejected": {"severity": 0}})
    (row,) = triage_records(pol, [{"id": "x", "prompt": "p", "chosen": "a", "rejected": "b", "meta": meta}])
    assert (row["chosen_verdict"], row["rejected_verdict"], row["category"]) == ("error", "compliant", "unresolved")
    assert "not a number" in row["reasons"]


def test_mistyped_metadata_is_an_error_verdict_with_its_reason():
    """Issue 14: a number or a string where the list of categories belongs, ``is_safe: "false"``
    (which ``bool()`` read as true), and any exception a rule raises, are ``error`` verdicts."""
    pol = _policy({"name": "cat", "kind": "meta", "harm_category": ["Violence"]},
                  {"name": "safe", "kind": "meta", "is_safe": False})
    metas = [{"harm_category": 3, "is_safe": True}, {"harm_category": "Violence", "is_safe": True},
             {"harm_category": [], "is_safe": "false"}, {"harm_category": [], "is_safe": False},
             {"harm_category": ["Violence"], "is_safe": True}]
    got = pol.check(["p"] * 5, ["r"] * 5, metas)
    assert [v.verdict for v in got] == ["error", "error", "error", "non_compliant", "non_compliant"]
    assert got[0].reasons == ["cat: response metadata 'harm_category' is 3, not a list of categories"]
    assert got[2].reasons == ["safe: response metadata 'is_safe' is 'false', not true or false"]

    class Odd(dict):  # a rule that raises something other than RuleUndecided
        def get(self, *a):
            raise KeyError("odd")

        def __contains__(self, k):
            raise TypeError("odd metadata")

    (v,) = _policy({"name": "eq", "kind": "meta", "equals": {"a": 1}}).check(["p"], ["r"], [Odd(a=1)])
    assert v.verdict == "error" and v.reasons[0].startswith("eq: rule raised KeyError")


def test_callable_rule_and_has_callable():
    pol = _policy({"name": "c", "kind": "callable", "function": "test_policy:violates_if_long"})
    assert pol.has_callable and not pol.has_judge
    got = pol.check(["p"] * 3, ["short", "a much longer answer", "boom"], None)
    assert [v.verdict for v in got] == ["compliant", "non_compliant", "error"]
    assert "RuntimeError: boom" in got[2].reasons[0]
    assert not load_policy(POLICIES[0]).has_callable


def test_fingerprint_and_pickle_roundtrip():
    a = _policy({"name": "w", "kind": "keywords", "keywords": ["gun"]})
    b = _policy({"name": "w", "kind": "keywords", "keywords": ["gun"]})
    c = _policy({"name": "w", "kind": "keywords", "keywords": ["guns"]})
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert re.fullmatch(r"t@1#[0-9a-f]{12}", a.fingerprint)
    d = pickle.loads(pickle.dumps(a))
    assert isinstance(d, Policy) and d.fingerprint == a.fingerprint
    assert d.check(["p"], ["a gun"], None) == [Verdict("non_compliant", ["w: keyword 'gun'"])]


BAD = [
    ("name: x\nversion: 1\nrules:\n  - {name: a, kind: keywords, keywords: [x]\n", r":5: invalid YAML"),
    ("name: x\nversion: 1\nrules:\n  - name: a\n    kind: keywords\n    keywords: [x]\n  - name: b\n    kind: magic\n",
     r"bad\.yaml:7: rule 'b' \(rules\[1\]\): unknown rule kind 'magic'; valid kinds: regex, keywords, meta, callable, judge"),
    ("name: x\nversion: 1\nrules:\n  - name: r\n    kind: regex\n    pattern: '(unclosed'\n", r":4: rule 'r' .*bad regex"),
    ("name: x\nrules:\n  - {name: a, kind: keywords, keywords: [x]}\n", r"missing required field 'version'"),
    ("name: x\nversion: 1\nrules:\n  - {name: m, kind: meta, harm_category: [Violense]}\n", r":4: .*unknown category 'Violense'"),
    ("name: x\nversion: 1\nrules:\n  - {name: k, kind: keywords, keyword: [x]}\n", r"unknown key 'keyword' for kind keywords"),
    ("name: x\nversion: 1\nrules:\n  - {name: k, kind: keywords, keywords: [x]}\n  - {name: k, kind: keywords, keywords: [y]}\n",
     r":5: rule 'k' \(rules\[1\]\): duplicate rule name"),
    ("name: x\nversion: 1\nrules:\n  - {name: c, kind: callable, function: 'no_such_mod:f'}\n", r"No module named 'no_such_mod'"),
    ("name: x\nversion: 1\nrules:\n  - {name: j, kind: judge, backend: tgi, model: m}\n", r"backend: 'tgi' is not one of"),
    ("name: x\nversion: 1\nrules:\n  - {name: j, kind: judge, model: m, template: 'no slots'}\n", r"template: must contain \{prompt\}"),
    ("name: x\nversion: 1\nrules:\n  - {name: j, kind: judge, model: m}\n  - {name: j2, kind: judge, model: m}\n",
     r"at most one judge rule"),
    ("name: x\nversion: 1\nmode: some\nrules:\n  - {name: k, kind: keywords, keywords: [x]}\n", r":3: mode: 'some'"),
    ("name: x\nversion: 1\nflavour: y\nrules: []\n", r":3: unknown key 'flavour'"),
]


@pytest.mark.parametrize("text,pattern", BAD)
def test_bad_policies_fail_early_naming_the_place(tmp_path, text, pattern):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(PolicyError, match=pattern):
        load_policy(p)
    assert issubclass(PolicyError, ValueError)


def test_judge_prompt_and_answer_parsing():
    pol = _policy({"name": "j", "kind": "judge", "model": "pypi:smollm2"})
    rule = pol.judge_rule
    assert pol.has_judge
    text = render_judge_prompt(rule, "How do I get a gun?", "Go to a store.")
    assert "no guns" in text and "How do I get a gun?" in text and "Go to a store." in text
    cases = {"Yes": "non_compliant", " yes.": "non_compliant", "**No**, it is fine": "compliant",
             "NO": "compliant", "maybe": "error", "": "error", "The answer is yes": "error", None: "error"}
    for answer, want in cases.items():
        assert parse_judge_answer(rule, answer) == want, answer
    got = pol.check(["p", "p", "p"], ["r", "r", "r"], None, judge_answers=["yes", "perhaps", None])
    assert [v.verdict for v in got] == ["non_compliant", "error", "error"]
    assert "neither yes nor no" in got[1].reasons[0] and got[2].reasons == ["j: no judge answer"]
