"""Policies (YAML spec) and their oracles: regex, keywords, metadata, python callables, LLM judge.

``load_policy(path_or_dict) -> Policy``; ``Policy.check(prompts, responses, metas,
judge_answers=None) -> list[Verdict]``; ``PolicyError`` for invalid specs (names file, line, rule).
"""

from trace_ray.policy.spec import VERDICTS, Policy, PolicyError, Verdict, load_policy

__all__ = ["load_policy", "Policy", "Verdict", "PolicyError", "VERDICTS"]
