"""The policy spec (YAML) → a validated ``Policy`` whose ``check`` judges responses.

```yaml
name: pku-harm
version: "2"
description: What an LLM judge is told the policy is.
mode: any            # non-compliant when any rule matches (``all``: when every rule matches)
rules:
  - {name: severe, kind: meta, severity_at_least: 2}
  - {name: weapons, kind: keywords, keywords: [gun, bomb]}
  - {name: howto, kind: regex, pattern: 'step \\d', flags: [IGNORECASE], timeout_s: 0.2}
  - {name: custom, kind: callable, function: "mypkg.rules:check"}
  - {name: llm, kind: judge, backend: hf, model: pypi:smollm2}
```

Everything is checked when the file is loaded (unknown key or kind, bad regex, missing field,
unimportable callable): one ``PolicyError`` naming the file, line and rule, before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import regex
import yaml

from trace_ray.chat import last_user_turn

from trace_ray.policy.rules import (
    PKU_HARM_CATEGORIES,
    REGEX_FLAGS,
    RULE_KINDS,
    JudgeRule,
    Rule,
    decide,
)

VERDICTS = ("compliant", "non_compliant", "error")
TOP_KEYS = {"name", "version", "description", "mode", "rules"}
COMMON_KEYS = {"name", "kind", "target", "description"}
KIND_KEYS = {
    "regex": {"pattern", "patterns", "flags", "timeout_s"},
    "keywords": {"keywords", "case_sensitive", "timeout_s"},
    "meta": {"harm_category", "severity_at_least", "is_safe", "equals"},
    "callable": {"function"},
    "judge": {"model", "backend", "template", "system", "answers", "max_new_tokens",
              "batch_size", "concurrency", "max_prompt_chars", "engine_kwargs"},
}
NAME_RE = regex.compile(r"^[A-Za-z0-9_.\-]+$")
_BUILT: dict[str, "Policy"] = {}


class PolicyError(ValueError):
    """An invalid policy; the message names the file, the line and the rule."""


@dataclass(frozen=True)
class Verdict:
    """One response's verdict. ``reasons``: ``"rule: detail"`` per matched rule (non_compliant) or
    per undecided rule (error); empty when compliant."""

    verdict: str
    reasons: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "reasons": list(self.reasons)}


class Policy:
    """A validated policy. ``check`` is pure Python (no Ray), so offline triage, Ray Data batches
    and the HTTP server all give the same answers."""

    def __init__(self, name: str, version: str, description: str, mode: str, rules: list[Rule], spec: dict):
        self.name = name
        self.version = version
        self.description = description
        self.mode = mode
        self.rules = rules
        self.spec = spec
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
        self.fingerprint = f"{name}@{version}#{digest[:12]}"

    @property
    def has_judge(self) -> bool:
        return any(r.kind == "judge" for r in self.rules)

    @property
    def has_callable(self) -> bool:
        return any(r.kind == "callable" for r in self.rules)

    @property
    def engines(self) -> dict[str, dict]:
        """Per rule: the engine the vectorised path runs it on (``trace_ray.policy.vector``)."""
        return {r.name: r.plan.to_dict() for r in self.rules}

    @property
    def judge_rule(self) -> JudgeRule | None:
        return next((r for r in self.rules if isinstance(r, JudgeRule)), None)

    def __repr__(self) -> str:
        return f"Policy({self.fingerprint}, mode={self.mode}, rules={[r.name for r in self.rules]})"

    def __reduce__(self):  # ship the spec (small, picklable) and rebuild on the worker
        return (load_policy, (self.spec,))

    def check(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        metas: Sequence[dict | None] | None = None,
        judge_answers: Sequence[str | None] | None = None,
    ) -> list[Verdict]:
        """Judge each (prompt, response, meta) item; ``judge_answers[i]`` is the raw judge text for
        item i (policies with a ``judge`` rule; missing → that rule is undecided → ``error``). A
        conversation prompt (messages, or their JSON text) is read by the rules as its last user turn.

        ``mode: any`` — non_compliant if any rule matches; else error if any rule was undecided;
        else compliant. ``mode: all`` — compliant if any rule does not match; else error if any was
        undecided; else non_compliant.
        """
        n = len(prompts)
        if len(responses) != n or (metas is not None and len(metas) != n):
            raise ValueError("prompts, responses and metas must have the same length")
        if judge_answers is not None and len(judge_answers) != n:
            raise ValueError("judge_answers must have one entry per item")
        out = []
        for i in range(n):
            meta = (metas[i] if metas is not None else None) or {}
            answer = judge_answers[i] if judge_answers is not None else None
            out.append(self._check_one(prompts[i], responses[i], meta, answer))
        return out

    def _check_one(self, prompt, response, meta, answer) -> Verdict:
        # what a rule sees as "the prompt": the last user turn of a conversation (a plain prompt as
        # it is); the judge's answer was produced from the whole conversation (trace_ray.policy.judge)
        prompt = last_user_turn(prompt)
        results = [decide(rule, prompt, response, meta, answer) for rule in self.rules]
        return combine(self.mode, [r.name for r in self.rules], results)


def combine(mode: str, names: Sequence[str], results: Sequence[tuple[str, str]]) -> Verdict:
    """Rule results of one response (``decide``'s ``(state, text)`` per rule, in rule order) → its
    verdict. ``any``: non_compliant if a rule hit (reasons: the hits); else error if one was
    undecided; else compliant. ``all``: compliant if a rule missed; else error if one was
    undecided; else non_compliant."""
    hits = [f"{n}: {t}" if t else n for n, (s, t) in zip(names, results) if s == "hit"]
    undecided = [f"{n}: {t}" for n, (s, t) in zip(names, results) if s == "undecided"]
    if mode == "any":
        if hits:
            return Verdict("non_compliant", hits)
        return Verdict("error", undecided) if undecided else Verdict("compliant", [])
    if any(s == "miss" for s, _ in results):
        return Verdict("compliant", [])
    return Verdict("error", undecided) if undecided else Verdict("non_compliant", hits)


def load_policy(path_or_dict: str | Path | dict | Policy) -> Policy:
    """A YAML file (path) or an already-parsed mapping → ``Policy``; raises ``PolicyError``."""
    if isinstance(path_or_dict, Policy):
        return path_or_dict
    if isinstance(path_or_dict, dict):
        key = json.dumps(path_or_dict, sort_keys=True, default=str)
        if key not in _BUILT:  # a policy unpickles on every Ray task: build it once per process
            if len(_BUILT) >= 32:
                _BUILT.clear()
            _BUILT[key] = _build(path_or_dict, "policy", {})
        return _BUILT[key]
    path = Path(path_or_dict)
    if not path.is_file():
        raise PolicyError(f"policy file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        lines = _rule_lines(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise PolicyError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path}:1: the top level must be a mapping with name, version, rules")
    return _build(data, str(path), lines)


def _rule_lines(text: str) -> dict:
    """Line (1-based) of the top level, of each top-level key and of each item of ``rules``."""
    node = yaml.compose(text)
    lines: dict = {"_top": 1}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            lines[k.value] = k.start_mark.line + 1
            if k.value == "rules" and isinstance(v, yaml.SequenceNode):
                lines["_rules"] = [item.start_mark.line + 1 for item in v.value]
    return lines


def _build(data: dict, where: str, lines: dict) -> Policy:
    def fail(msg: str, key: str = "_top", rule_idx: int | None = None) -> PolicyError:
        line = None
        if rule_idx is not None and rule_idx < len(lines.get("_rules", [])):
            line = lines["_rules"][rule_idx]
        elif key in lines:
            line = lines[key]
        return PolicyError(f"{where}{f':{line}' if line else ''}: {msg}")

    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(TOP_KEYS))}", unknown[0])
    for key in ("name", "version", "rules"):
        if key not in data or data[key] in (None, "", []):
            raise fail(f"missing required field {key!r}", key)
    name, version = str(data["name"]), str(data["version"])
    mode = data.get("mode", "any")
    if mode not in ("any", "all"):
        raise fail(f"mode: {mode!r} is not one of 'any', 'all'", "mode")
    if not isinstance(data["rules"], list):
        raise fail("rules: expected a list of rules", "rules")
    description = str(data.get("description") or "")
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, raw in enumerate(data["rules"]):
        label = f"rules[{i}]"
        if not isinstance(raw, dict):
            raise fail(f"{label}: expected a mapping with name and kind", rule_idx=i)
        rname = str(raw.get("name") or f"{raw.get('kind', 'rule')}_{i}")
        label = f"rule {rname!r} ({label})"
        try:
            rule = _build_rule(raw, rname, description)
        except (ValueError, TypeError, KeyError, ImportError, AttributeError, regex.error) as e:
            raise fail(f"{label}: {e}", rule_idx=i) from None
        if rname in seen:
            raise fail(f"{label}: duplicate rule name", rule_idx=i)
        seen.add(rname)
        rule.line = lines["_rules"][i] if i < len(lines.get("_rules", [])) else None
        rules.append(rule)
    if sum(r.kind == "judge" for r in rules) > 1:
        raise fail("at most one judge rule per policy (put all criteria in its description)", "rules")
    from trace_ray.policy.vector import plan_rules

    plan_rules(rules)  # the vectorised engine of each rule is decided here, once
    return Policy(name, version, description, mode, rules, _plain(data))


def _build_rule(raw: dict, name: str, description: str) -> Rule:
    kind = raw.get("kind")
    if kind not in RULE_KINDS:
        raise ValueError(f"unknown rule kind {kind!r}; valid kinds: {', '.join(RULE_KINDS)}")
    if not NAME_RE.match(name):
        raise ValueError(f"name {name!r} may only use letters, digits, '_', '-', '.'")
    allowed = COMMON_KEYS | KIND_KEYS[kind]
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} for kind {kind}; valid: {', '.join(sorted(allowed))}")
    target = raw.get("target", "response")
    if target not in ("response", "prompt"):
        raise ValueError(f"target: {target!r} is not one of 'response', 'prompt'")
    common = dict(name=name, kind=kind, target=target, description=str(raw.get("description") or ""))
    cls = RULE_KINDS[kind]

    if kind == "regex":
        pats = raw.get("patterns") or ([raw["pattern"]] if raw.get("pattern") else [])
        if not pats or not all(isinstance(p, str) and p for p in pats):
            raise ValueError("needs 'pattern' (a string) or 'patterns' (a list of strings)")
        flags = _str_list(raw.get("flags", []), "flags")
        bad = [f for f in flags if f.upper() not in REGEX_FLAGS]
        if bad:
            raise ValueError(f"flags: unknown flag {bad[0]!r}; valid: {', '.join(REGEX_FLAGS)}")
        for p in pats:
            try:
                regex.compile(p)
            except regex.error as e:
                raise ValueError(f"bad regex {p!r}: {e}") from None
        rule = cls(**common, patterns=list(pats), flags=flags, timeout_s=_timeout(raw))
        rule.compile()
        return rule
    if kind == "keywords":
        kws = _str_list(raw.get("keywords"), "keywords")
        if not kws or not all(k.strip() for k in kws):
            raise ValueError("keywords: needs a non-empty list of non-empty strings")
        cs = raw.get("case_sensitive", False)
        if not isinstance(cs, bool):
            raise ValueError("case_sensitive: expected true or false")
        rule = cls(**common, keywords=kws, case_sensitive=cs, timeout_s=_timeout(raw))
        rule.compile()
        return rule
    if kind == "meta":
        conds = {k: raw[k] for k in KIND_KEYS["meta"] if k in raw}
        if not conds:
            raise ValueError("needs at least one of harm_category, severity_at_least, is_safe, equals")
        if "harm_category" in conds:
            cats = _str_list(conds["harm_category"], "harm_category")
            bad = [c for c in cats if c not in PKU_HARM_CATEGORIES]
            if bad or not cats:
                raise ValueError(
                    f"harm_category: unknown category {bad[0] if bad else None!r}; "
                    f"valid: {', '.join(PKU_HARM_CATEGORIES)}"
                )
            conds["harm_category"] = cats
        sev = conds.get("severity_at_least")
        if sev is not None and (not isinstance(sev, int) or isinstance(sev, bool)):
            raise ValueError("severity_at_least: expected an integer (PKU: 0-3)")
        if "is_safe" in conds and not isinstance(conds["is_safe"], bool):
            raise ValueError("is_safe: expected true or false")
        if "equals" in conds and not isinstance(conds["equals"], dict):
            raise ValueError("equals: expected a mapping field -> value")
        return cls(**common, **conds)
    if kind == "callable":
        fn = raw.get("function")
        if not isinstance(fn, str) or ":" not in fn:
            raise ValueError("function: expected 'module:function'")
        rule = cls(**common, function=fn)
        rule.resolve()
        return rule
    # judge
    if not raw.get("model"):
        raise ValueError("model: required (an HF folder, a .gguf file, or pypi:smollm2)")
    backend = raw.get("backend", "hf")
    if backend not in ("hf", "vllm"):
        raise ValueError(f"backend: {backend!r} is not one of 'hf', 'vllm'")
    kwargs = {k: raw[k] for k in KIND_KEYS["judge"] if k in raw}
    answers = kwargs.get("answers")
    if answers is not None:
        if not isinstance(answers, dict) or set(answers) != {"non_compliant", "compliant"}:
            raise ValueError("answers: expected {non_compliant: [words], compliant: [words]}")
        kwargs["answers"] = {k: [str(w).lower() for w in _str_list(v, f"answers.{k}")] for k, v in answers.items()}
    template = kwargs.get("template", JudgeRule.template)
    for slot in ("{prompt}", "{response}"):
        if slot not in template:
            raise ValueError(f"template: must contain {slot}")
    for k in ("max_new_tokens", "batch_size", "concurrency", "max_prompt_chars"):
        if k in kwargs and (not isinstance(kwargs[k], int) or kwargs[k] < 1):
            raise ValueError(f"{k}: expected a positive integer")
    rule = cls(**common, **kwargs, policy_description=description)
    from trace_ray.policy.judge import render_judge_prompt

    render_judge_prompt(rule, "p", "r")  # a template with unknown {slots} fails here, not mid-run
    return rule


def _str_list(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}: expected a list of strings")
    return list(value)


def _timeout(raw: dict) -> float:
    t = raw.get("timeout_s", 0.2)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 60:
        raise ValueError("timeout_s: expected a number of seconds in (0, 60]")
    return float(t)


def _plain(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))
