"""The held-out and validation splits: a row-level decision from a stable hash of the row's prompt.

``split_of(prompt, row_id, holdout, validation)`` → ``"train"`` | ``"validation"`` | ``"heldout"``:
``u = sha256(SALT + key)`` read as a number in [0, 1); ``u < holdout`` → heldout,
``u < holdout + validation`` → validation, else train.

- **The key is the prompt** (as stored: a conversation's JSON text, or the plain string), not the
  row id: pairs that share a prompt always land on the same side, so a held-out prompt is never
  seen in training (with the row id, two pairs on one prompt could straddle the split). A row
  with an empty prompt (e.g. a malformed line) is keyed by its id.
- Stable: the same prompt gets the same split in every run, on every machine, in any row order
  or sharding, whatever else is in the file; a larger fraction only moves rows *into* the
  held-out split (its set grows monotonically with the fraction).
- The held-out split is never trained on and never used to pick hyper-parameters; the
  validation split is for picking them (e.g. the learning rate).

Triage writes each split beside the others (``OUT/triaged.parquet`` = train,
``OUT/validation.parquet``, ``OUT/heldout.parquet``); :func:`split_of_path` reads which one a
path is from its name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SPLITS = ("train", "validation", "heldout")
FILES = {"train": "triaged.parquet", "validation": "validation.parquet", "heldout": "heldout.parquet"}
SALT = b"trace-ray/split/v1\x1f"


def check_fractions(holdout: float, validation: float) -> None:
    """Both in [0, 1) and together below 1; the message names the flag."""
    for flag, v in (("--holdout", holdout), ("--validation", validation)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError(f"{flag}: a fraction in [0, 1), got {v!r}")
    if holdout + validation >= 1.0:
        raise ValueError(f"--holdout + --validation must leave rows to train on (< 1), got {holdout + validation}")


def unit(key: str) -> float:
    """sha256 of the salted key as a number in [0, 1) (the first 8 bytes, big-endian / 2**64)."""
    digest = hashlib.sha256(SALT + key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(prompt: str | None, row_id: str, holdout: float, validation: float = 0.0) -> str:
    u = unit(prompt if prompt else f"id:{row_id}")
    if u < holdout:
        return "heldout"
    if u < holdout + validation:
        return "validation"
    return "train"


def split_table(table, holdout: float, validation: float = 0.0) -> dict:
    """``{split: the rows of ``table`` (a ``pyarrow.Table`` with ``prompt`` and ``id``) in it}``,
    row order kept; every split present (empty tables included)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    labels = pa.array([split_of(p, i, holdout, validation)
                       for p, i in zip(table.column("prompt").to_pylist(), table.column("id").to_pylist())])
    return {s: table.filter(pc.equal(labels, s)) for s in SPLITS}


def split_of_path(path: str | Path) -> str | None:
    """Which split a triage output is, from its name (``heldout.parquet`` → ``heldout``,
    ``triaged.parquet`` → ``train``); None when the name says nothing."""
    p = Path(path)
    for split, name in FILES.items():
        if p.name == name:
            return split
    return None
