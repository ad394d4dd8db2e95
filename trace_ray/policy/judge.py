"""The LLM judge: prompt rendering, answer parsing, and the two engines that produce answers.

- ``render_judge_prompt(rule, prompt, response)`` / ``parse_judge_answer(rule, text)``: pure
  Python, shared by the offline triage, the hf actor, the vLLM path and the HTTP server.
- ``HFJudge``: a Ray Data class UDF (one model per actor) that runs transformers ``generate``,
  greedy, on CPU or GPU — use with ``map_batches(HFJudge, compute=ActorPoolStrategy(size=k))``.
- ``vllm_judge(ds, rule)``: Ray Data's LLM batch processor (``ray.data.llm``, vLLM engines as
  actors) on GPUs; vLLM and ``ray.data.llm`` are imported only there.

Both engines add the columns ``judge_chosen`` and ``judge_rejected`` (raw answer text) that
``trace_ray.triage`` passes to ``Policy.check(..., judge_answers=...)``.
"""

from __future__ import annotations

import string

JUDGE_COLUMNS = ("judge_chosen", "judge_rejected")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2 :]


def render_judge_prompt(rule, prompt: str, response: str) -> str:
    """The user message sent to the judge: ``rule.template`` with ``{description}`` (the policy's
    description), ``{prompt}`` and ``{response}`` filled in; long texts are clipped in the middle
    to ``rule.max_prompt_chars`` so one huge row cannot blow the judge's context."""
    half = max(1, rule.max_prompt_chars // 2)
    return rule.template.format(
        description=rule.policy_description or "(no description given)",
        prompt=_clip(prompt or "", half),
        response=_clip(response or "", half),
    )


def parse_judge_answer(rule, text) -> str:
    """Raw judge text → ``"non_compliant"`` | ``"compliant"`` | ``"error"``.

    The first word of the answer (lower-cased, punctuation and markdown stripped) is looked up in
    ``rule.answers`` (default: yes → non_compliant, no → compliant). Anything else — empty text,
    "maybe", a sentence that does not start with yes/no — is ``error``: a judge that does not
    answer the question must not decide a pair.
    """
    if not isinstance(text, str):
        return "error"
    words = text.strip().split()
    if not words:
        return "error"
    first = words[0].strip(string.punctuation + "*_`\"'").lower()
    for verdict in ("non_compliant", "compliant"):
        if first in rule.answers[verdict]:
            return verdict
    return "error"
