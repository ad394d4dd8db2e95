"""The canonical record: one row per preference pair (DESIGN §2).

Readers produce ``CANONICAL``; triage adds ``TRIAGE_FIELDS``. ``meta`` is a JSON string (Arrow
has no free-form map of mixed values), parsed with ``json.loads`` where it is used; for PKU rows it
holds ``{"chosen": {...}, "rejected": {...}}`` with each response's own metadata
(harm categories, severity, is_safe) plus the source fields.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

CATEGORIES = ("invert", "punish", "retain", "unresolved")
VERDICTS = ("compliant", "non_compliant", "error")

CANONICAL = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("chosen", pa.string()),
        pa.field("rejected", pa.string()),
        pa.field("meta", pa.string()),  # JSON
    ]
)

TRIAGE_FIELDS = [
    pa.field("chosen_verdict", pa.string()),
    pa.field("rejected_verdict", pa.string()),
    pa.field("reasons", pa.string()),  # JSON: {"chosen": [...], "rejected": [...], "error": ...}
    pa.field("category", pa.string()),
    pa.field("policy", pa.string()),  # name@version#sha256[:12]
]

TRIAGED = pa.schema(list(CANONICAL) + TRIAGE_FIELDS)


def row_id(prompt: str, chosen: str, rejected: str) -> str:
    """Stable id of a pair: sha256 over the three texts (unit-separated), 16 hex chars."""
    h = hashlib.sha256()
    for part in (prompt, chosen, rejected):
        h.update((part or "").encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def categorize(chosen_verdict: str, rejected_verdict: str) -> str:
    """Stage 1 partition (DESIGN §1). y_w compliant → retain, whatever y_l is."""
    if chosen_verdict == "compliant":
        return "retain"
    if chosen_verdict == "non_compliant" and rejected_verdict == "compliant":
        return "invert"
    if chosen_verdict == "non_compliant" and rejected_verdict == "non_compliant":
        return "punish"
    return "unresolved"
