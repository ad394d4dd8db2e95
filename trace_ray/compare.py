"""Policy what-if before training (``trace-ray triage --compare OLD``): how the pairs move between
categories from the OLD policy to the NEW one, with examples of each move and an estimate of the
re-alignment work.

Both policies file every pair in the same triage pass (``TriageBatch`` adds ``old_category`` and
``old_reasons`` when an old policy is given; the old policy's rules only — a judge rule in OLD is
refused before any work). ``Movement.add`` accumulates the 4×4 table from output batches.

Work estimate (what a platform team asks before it spends GPU hours):
- ``conflict_rows``: invert + punish under NEW (the rows TRACE trains on with DPO/NPO);
  ``new_conflict_rows``: those that were not conflicts under OLD; ``retain_rows`` (KL anchor);
- ``conflict_tokens`` / ``all_loss_tokens``: estimated tokens per epoch of the sequences the
  trainer runs (prompt + chosen and prompt + rejected for a conflict row, prompt + chosen for a
  retain row), at ``CHARS_PER_TOKEN`` characters per token (English BPE tokenizers: ~4); the
  prompt counted as its conversation's text (``trace_ray.chat.transcript``).
"""

from __future__ import annotations

import json

from trace_ray.chat import transcript
from trace_ray.data.schema import CATEGORIES

CHARS_PER_TOKEN = 4
EXAMPLES_PER_MOVE = 2
CONFLICT = ("invert", "punish")


def _short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[:n] + "…"


def _tail(text: str, n: int = 200) -> str:
    """The end of a prompt (a conversation's last turns are what matter)."""
    return text if len(text) <= n else "…" + text[-n:]


class Movement:
    """The 4×4 table (old category → new category), examples per move, and the work estimate."""

    def __init__(self, old_policy: str, new_policy: str, examples: int = EXAMPLES_PER_MOVE):
        self.old, self.new, self.k = old_policy, new_policy, examples
        self.matrix = {o: {n: 0 for n in CATEGORIES} for o in CATEGORIES}
        self.examples: dict[str, list] = {}
        self.chars = {"conflict": 0, "all_loss": 0}
        self.new_conflict = 0

    def add(self, table) -> None:
        """One output batch with the ``TRIAGED`` columns plus ``old_category`` and ``old_reasons``."""
        cols = table.select(["id", "prompt", "chosen", "rejected", "category", "reasons", "old_category",
                             "old_reasons"]).to_pylist()
        for r in cols:
            old, new = r["old_category"], r["category"]
            self.matrix[old][new] += 1
            if new in CONFLICT:
                self.new_conflict += old not in CONFLICT
                p = len(transcript(r["prompt"]))
                n = 2 * p + len(r["chosen"]) + len(r["rejected"])
                self.chars["conflict"] += n
                self.chars["all_loss"] += n
            elif new == "retain":
                self.chars["all_loss"] += len(transcript(r["prompt"])) + len(r["chosen"])
            move = f"{old}→{new}"
            if old != new and len(self.examples.setdefault(move, [])) < self.k:
                self.examples[move].append({
                    "id": r["id"], "prompt": _tail(transcript(r["prompt"])),
                    "chosen": _short(r["chosen"]), "rejected": _short(r["rejected"]),
                    "old_reasons": json.loads(r["old_reasons"]), "new_reasons": json.loads(r["reasons"]),
                })

    def to_dict(self) -> dict:
        total = sum(sum(row.values()) for row in self.matrix.values())
        by_new = {c: sum(self.matrix[o][c] for o in CATEGORIES) for c in CATEGORIES}
        by_old = {c: sum(self.matrix[c].values()) for c in CATEGORIES}
        moved = total - sum(self.matrix[c][c] for c in CATEGORIES)
        return {
            "old_policy": self.old, "new_policy": self.new, "total": total,
            "matrix": self.matrix, "old_counts": by_old, "new_counts": by_new,
            "moved": moved, "moved_share": round(moved / total, 4) if total else 0.0,
            "examples": self.examples,
            "work": {
                "conflict_rows": by_new["invert"] + by_new["punish"],
                "new_conflict_rows": self.new_conflict,
                "retain_rows": by_new["retain"],
                "conflict_tokens": self.chars["conflict"] // CHARS_PER_TOKEN,
                "all_loss_tokens": self.chars["all_loss"] // CHARS_PER_TOKEN,
                "tokens_are": f"estimated at {CHARS_PER_TOKEN} characters per token, per epoch",
            },
        }


def format_compare(c: dict) -> str:
    """The table printed by ``trace-ray triage --compare``."""
    w = max(len(x) for x in CATEGORIES) + 2
    lines = [f"policy what-if: {c['old_policy']}  →  {c['new_policy']}  ({c['total']} pairs, "
             f"{c['moved']} moved, {100 * c['moved_share']:.1f}%)",
             "  old \\ new".ljust(w + 2) + "".join(n.rjust(w) for n in CATEGORIES) + "total".rjust(w)]
    for o in CATEGORIES:
        row = c["matrix"][o]
        lines.append(f"  {o}".ljust(w + 2) + "".join(str(row[n]).rjust(w) for n in CATEGORIES)
                     + str(c["old_counts"][o]).rjust(w))
    lines.append("  total".ljust(w + 2) + "".join(str(c["new_counts"][n]).rjust(w) for n in CATEGORIES)
                 + str(c["total"]).rjust(w))
    wk = c["work"]
    lines.append(f"  re-alignment work: {wk['conflict_rows']} conflict rows (invert + punish; "
                 f"{wk['new_conflict_rows']} newly conflicting), {wk['retain_rows']} retain rows; "
                 f"≈{wk['conflict_tokens']:,} conflict tokens, ≈{wk['all_loss_tokens']:,} tokens with a loss "
                 f"per epoch ({CHARS_PER_TOKEN} chars/token)")
    for move, exs in c["examples"].items():
        ex = exs[0]
        lines.append(f"  e.g. {move}: {ex['prompt'][-60:].strip()!r} -> chosen {ex['chosen'][:50]!r}")
    return "\n".join(lines)
