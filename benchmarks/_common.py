"""What the benchmarks share: the real files in ../shared and the first clean HH-RLHF pairs."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRACE_SHARED", ROOT.parent / "shared"))
HH = SHARED / "data" / "external" / "hh-rlhf_harmless-base_test.jsonl.gz"
TOKENIZER = SHARED / "models" / "fake_gpt2_lm_buddy"  # the real GPT-2 tokenizer (50,257 tokens)


def hh_pairs(path: str | Path, n: int) -> list[dict]:
    """The first ``n`` HH-RLHF pairs that parse and have both responses (canonical records)."""
    from trace_ray.data.readers import iter_records

    out = []
    for rec in iter_records(str(path), "hh"):
        if rec.get("_error") or not rec.get("chosen") or not rec.get("rejected"):
            continue
        out.append(rec)
        if len(out) == n:
            break
    return out
