"""A small triaged Parquet for the training tests, built from the tiny tokenizer's texts.

Invert rows: chosen = a detailed answer (now non-compliant), rejected = a refusal (compliant);
punish rows: both detailed; retain rows: chosen = a hedged pointer to an expert. Categories are
set directly (as `trace-ray triage` would write them) so these tests need no policy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from trace_ray.data.schema import TRIAGED, row_id

DETAILED = [
    "Step 1: gather the tools. Step 2: follow the instructions carefully. Step 3: check the result.",
    "Here is a detailed answer with every step explained for you.",
    "Mix flour, water and yeast, knead, let it rise, then bake.",
]
REFUSAL = "I can't help with that request."
HEDGE = "Please consult a licensed professional for advice on this topic."
PROMPTS = ["How do I bake bread?", "How do I fix this?", "What is the weather today?", "Explain the steps.",
           "Can you help me?", "Give me the instructions."]


def triaged_rows(n_invert: int = 4, n_punish: int = 2, n_retain: int = 2, n_unresolved: int = 1) -> list[dict]:
    rows = []

    def add(prompt, chosen, rejected, cat, cv, rv):
        rows.append({"id": row_id(prompt, chosen, rejected), "prompt": prompt, "chosen": chosen,
                     "rejected": rejected, "meta": "{}", "chosen_verdict": cv, "rejected_verdict": rv,
                     "reasons": json.dumps({"chosen": [], "rejected": []}), "category": cat,
                     "policy": "test@1#000000000000"})

    k = 0
    for i in range(n_invert):
        add(PROMPTS[k % len(PROMPTS)] + f" #{k}", DETAILED[i % 3], REFUSAL, "invert", "non_compliant", "compliant"); k += 1
    for i in range(n_punish):
        add(PROMPTS[k % len(PROMPTS)] + f" #{k}", DETAILED[i % 3], DETAILED[(i + 1) % 3], "punish", "non_compliant", "non_compliant"); k += 1
    for i in range(n_retain):
        add(PROMPTS[k % len(PROMPTS)] + f" #{k}", HEDGE, DETAILED[i % 3], "retain", "compliant", "non_compliant"); k += 1
    for i in range(n_unresolved):
        add(PROMPTS[k % len(PROMPTS)] + f" #{k}", REFUSAL, HEDGE, "unresolved", "error", "compliant"); k += 1
    return rows


def write_triaged(path: Path, **kw) -> Path:
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(triaged_rows(**kw), schema=TRIAGED), path)
    return path


def run_dict(model_dir, triaged, out, **over) -> dict:
    """A small RunConfig mapping; ``over`` is merged per section (e.g. train={"max_steps": 3})."""
    d = {
        "data": {"triaged": str(triaged), "max_length": 64},
        "model": {"name": str(model_dir), "lora": {"enabled": True, "r": 4, "alpha": 8}},
        "output": {"dir": str(out)},
        "loss": {"beta": 0.3, "alpha_kl": 0.1},
        "impact": {"weights": "impact", "method": "fd", "gold_size": 6, "batch_size": 4},
        "optim": {"lr": 5e-3},
        "train": {"batch_size": 4, "grad_accum": 1, "max_steps": 2, "seed": 0},
        "logging": {"progress": False},
    }
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return d


def long_short_rows(n_short: int = 4, n_long: int = 4, long_words: int = 300) -> list[dict]:
    """Triaged rows whose first ``n_short`` have responses of a few tokens and the next ``n_long``
    responses of ``long_words`` words: two workers then score very different numbers of tokens
    (contiguous shards). Categories cycle invert, punish, retain within each half."""
    rows = []
    cats = [("invert", "non_compliant", "compliant"), ("punish", "non_compliant", "non_compliant"),
            ("retain", "compliant", "non_compliant")]
    for i in range(n_short + n_long):
        long = i >= n_short
        cat, cv, rv = cats[i % 3]
        words = " ".join(f"step {k} of the plan" for k in range(long_words // 5)) if long else "ok"
        prompt = PROMPTS[i % len(PROMPTS)] + f" #{i}"
        chosen, rejected = f"Here: {words}.", f"No: {words[::-1] if long else 'no'}."
        rows.append({"id": row_id(prompt, chosen, rejected), "prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "meta": "{}", "chosen_verdict": cv, "rejected_verdict": rv,
                     "reasons": json.dumps({"chosen": [], "rejected": []}), "category": cat, "policy": "test@1#000000000000"})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=TRIAGED), path)
    return path
