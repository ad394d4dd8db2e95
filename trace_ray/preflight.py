"""The pre-flight check of triage: stop before any work when the data is mostly unresolved for
one reason, instead of writing an all-unresolved table.

``check_resolvable(source, fmt, policy, ...)`` reads the first ``SAMPLE_ROWS`` rows in plain
Python, files them with the policy's rules (judge rules are skipped: they would need the model),
and counts the unresolved rows by reason kind (``trace_ray.triage_output.reason_kind``). When one reason
covers at least ``STOP_SHARE`` of the sample, it raises ``MostlyUnresolved`` naming the reason and
the flag that probably fixes it (e.g. ``--prompt-key`` for "missing field 'prompt'").
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from typing import Callable

SAMPLE_ROWS = 1000
STOP_SHARE = 0.9


class MostlyUnresolved(ValueError):
    """Most rows of the sample are unresolved for one reason; nothing was written."""


def hint(kind: str, fmt: str, columns: list[str]) -> str:
    """The flag (or fix) that probably resolves rows unresolved for ``kind``."""
    cols = f" (the file's columns: {', '.join(columns)})" if columns else ""
    if kind.startswith("missing field") and kind.endswith("-key)"):
        flag = kind.rsplit("(", 1)[1].rstrip(")")
        return f"the column given to {flag} is not in the rows{cols}"
    for name in ("prompt", "chosen", "rejected"):
        if kind == f"missing field {name!r}":
            extra = (", or --format implicit if chosen/rejected hold whole conversations"
                     if name == "prompt" else "")
            return f"name the {name} column with --{name}-key COLUMN{cols}{extra}"
    if kind.startswith("missing field"):
        return f"the rows lack a column this format needs{cols}: check --format (now {fmt})"
    if "is not a string" in kind or "not a list of messages" in kind or "not a message" in kind:
        return f"check --format (now {fmt}) and the column flags --prompt-key/--chosen-key/--rejected-key{cols}"
    if "share no opening turn" in kind:
        return "the conversations do not share a prompt; if the file has a prompt column, name it with --prompt-key"
    if "assistant reply" in kind:
        return ("chosen/rejected must end in one assistant reply after the prompt; check --chosen-key/"
                f"--rejected-key and --format (now {fmt}){cols}")
    if "empty response" in kind:
        return f"the responses are empty: check --chosen-key/--rejected-key{cols}"
    if "metadata has no" in kind:
        return ("the policy's meta rules read per-response labels these rows lack: use --format pku for "
                "PKU-SafeRLHF files, or a policy with text rules")
    if "UTF-8" in kind:
        return "the file is not UTF-8 text: re-encode it"
    if "invalid JSON" in kind or "expected a JSON object" in kind:
        return "the file is not JSON lines of objects: check the file and --format"
    return f"check --format (now {fmt}) and the column flags --prompt-key/--chosen-key/--rejected-key{cols}"


def check_resolvable(records, columns: list[str], policy, fmt: str, *, sample: int = SAMPLE_ROWS,
                     share: float = STOP_SHARE, file_rows: Callable[[list[dict]], list[dict]] | None = None) -> dict:
    """Raise ``MostlyUnresolved`` when one reason leaves ``share`` of the first ``sample`` records
    unresolved; else return ``{"rows": n, "unresolved": {kind: count}}``. ``file_rows(records)``
    files the sample with a rules-only ``policy`` (default: the row-wise reference,
    ``triage_records``; ``run_triage`` hands in the vectorised rules, ``triage_table_records``:
    the same verdicts, ~10x faster on long texts)."""
    from trace_ray.triage_output import reason_kind
    from trace_ray.triage_rows import triage_records

    rows = list(islice(records, sample))
    if not rows:
        return {"rows": 0, "unresolved": {}}
    if policy is not None and not policy.has_judge:
        filed = file_rows(rows) if file_rows is not None else triage_records(policy, rows)
    else:  # a judge cannot run here: only the reader's verdict on each row
        filed = [{"category": "unresolved", "chosen_verdict": "error", "rejected_verdict": "error",
                  "reasons": {"error": r["_error"]}} for r in rows if r.get("_error")]
    kinds: Counter = Counter()
    for row in filed:
        if row["category"] == "unresolved":
            reasons = row["reasons"] if isinstance(row["reasons"], dict) else json.loads(row["reasons"])
            kinds[reason_kind(row, reasons)] += 1
    if kinds:
        kind, n = kinds.most_common(1)[0]
        if n >= share * len(rows):
            raise MostlyUnresolved(
                f"{n} of the first {len(rows)} rows would be unresolved because: {kind}. "
                f"Probable fix: {hint(kind, fmt, columns)}. Nothing was written "
                "(--allow-unresolved triages the data anyway)."
            )
    return {"rows": len(rows), "unresolved": dict(kinds)}
