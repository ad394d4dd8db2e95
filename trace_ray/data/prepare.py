"""Preparing a preference file for short-sequence runs: each conversation reduced to its last user
turn.

``write_last_turn_pairs(data, out)`` reads any supported file (``iter_records``: HH-RLHF
transcripts, TRL formats, ...) and writes a TRL conversational JSON-lines file whose ``prompt`` is
the one-message conversation ``[{"role": "user", "content": <last user turn>}]`` and whose
``chosen`` / ``rejected`` are the responses as they were. Why: on a CPU the cost of every stage
grows with the sequence length, and an HH-RLHF transcript runs to hundreds of tokens while its
last user turn is a few dozen; rule oracles read only the last user turn anyway
(``trace_ray.chat.last_user_turn``). The responses were written for the whole conversation, so a
reply to a short turn ("Yes.", "How?") loses its context: the price of the short sequences.

Nothing is dropped: a malformed row is written without a prompt and with its reason in an
``error`` field (triage files it as ``unresolved``, "missing field 'prompt'", and keeps the
original reason in ``meta.fields.error``); every row keeps its original ``id``, so a prepared row
can be traced back to its source.
"""

from __future__ import annotations

import json
from pathlib import Path

from trace_ray.chat import as_messages, last_user_turn


def last_turn_record(rec: dict) -> dict:
    """One canonical record with its conversation prompt reduced to the last user turn (a plain
    prompt becomes a one-message conversation too)."""
    out = {k: rec.get(k) for k in ("id", "chosen", "rejected")}
    if rec.get("_error"):
        out["error"] = rec["_error"]
        return out
    prompt = rec.get("prompt") or ""
    out["prompt"] = [{"role": "user", "content": last_user_turn(prompt) if as_messages(prompt) is not None else prompt}]
    return out


def write_last_turn_pairs(data: str | Path, out: str | Path, format: str = "auto") -> dict:
    """Write ``out`` (JSON lines, TRL conversational) from ``data``; returns ``{"rows", "malformed"}``."""
    from trace_ray.data.readers import iter_records

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = bad = 0
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in iter_records(data, format):
            n += 1
            bad += bool(rec.get("_error"))
            f.write(json.dumps(last_turn_record(rec), ensure_ascii=False) + "\n")
    tmp.replace(out)
    return {"rows": n, "malformed": bad, "source": str(data), "out": str(out)}
