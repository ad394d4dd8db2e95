"""The row-wise reference of triage: ``triage_records(policy, records, judge_answers=None)``.

Plain Python, one record at a time through ``Policy.check``: what the HTTP server
(``/v1/triage``) and the pre-flight check (``trace_ray.preflight``) run, and what the vectorised
``trace_ray.triage.triage_table`` is tested against. ``trace_ray.triage`` re-exports it.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from trace_ray.data.schema import categorize, row_id
from trace_ray.policy import Policy


def _norm(rec: dict) -> tuple[dict, str | None, dict]:
    """A record as given (reader output, a user's dict, an HTTP body) → (canonical fields, error, meta)."""
    err = rec.get("_error")
    err = err if isinstance(err, str) and err else None  # pandas may hand over NaN for null
    out: dict[str, Any] = {}
    for key in ("prompt", "chosen", "rejected"):
        v = rec.get(key)
        if not isinstance(v, str):
            err = err or (f"missing field {key!r}" if v is None else f"field {key!r} is not a string")
            v = "" if v is None else str(v)
        elif key != "prompt" and not v.strip():
            err = err or f"empty response: {key!r}"
        out[key] = v
    meta = rec.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta else {}
        except json.JSONDecodeError:
            err = err or "meta is not valid JSON"
            meta = {"raw": meta}
    meta = meta if isinstance(meta, dict) else {}
    out["id"] = str(rec["id"]) if rec.get("id") not in (None, "") else row_id(out["prompt"], out["chosen"], out["rejected"])
    out["meta"] = json.dumps(meta, ensure_ascii=False, default=str)
    return out, err, meta


def triage_records(
    policy: Policy,
    records: Sequence[dict],
    judge_answers: Sequence[tuple[str | None, str | None]] | None = None,
) -> list[dict]:
    """Triage canonical records; returns one dict per record with the ``TRIAGED`` columns.

    ``judge_answers[i] = (answer for chosen, answer for rejected)`` — raw judge text, for policies
    with a judge rule (missing → that response's verdict is ``error``). Per-response metadata for
    ``meta`` rules is read from ``meta["chosen"]`` / ``meta["rejected"]``.
    """
    if judge_answers is not None and len(judge_answers) != len(records):
        raise ValueError("judge_answers must have one (chosen, rejected) pair per record")
    normed = [_norm(r) for r in records]
    good = [i for i, (_, err, _) in enumerate(normed) if err is None]
    prompts, responses, metas, answers = [], [], [], []
    for side in ("chosen", "rejected"):
        for i in good:
            rec, _, meta = normed[i]
            prompts.append(rec["prompt"])
            responses.append(rec[side])
            m = meta.get(side)
            metas.append(m if isinstance(m, dict) else {})
            answers.append(judge_answers[i][0 if side == "chosen" else 1] if judge_answers is not None else None)
    verdicts = policy.check(prompts, responses, metas, answers if judge_answers is not None else None)
    by_row = {i: (verdicts[k], verdicts[k + len(good)]) for k, i in enumerate(good)}
    out = []
    for i, (rec, err, _) in enumerate(normed):
        if err is not None:
            cv = rv = "error"
            reasons: dict = {"error": err}
            category = "unresolved"
        else:
            c, r = by_row[i]
            cv, rv = c.verdict, r.verdict
            reasons = {"chosen": c.reasons, "rejected": r.reasons}
            category = categorize(cv, rv)
        out.append({
            **{k: rec[k] for k in ("id", "prompt", "chosen", "rejected", "meta")},
            "chosen_verdict": cv,
            "rejected_verdict": rv,
            "reasons": json.dumps(reasons, ensure_ascii=False),
            "category": category,
            "policy": policy.fingerprint,
        })
    return out
