"""The ``pairs`` format a whole Arrow batch at a time (the readers' fast path: Parquet / Arrow
batches, and blocks of JSON lines parsed by Arrow's JSON reader).

A batch whose columns are exactly ``prompt``, ``chosen``, ``rejected`` (+ ``id``), all strings,
without nulls, blank responses or conversation prompts (JSON text of messages, which the reader
re-stores), becomes canonical records without a Python object per row:
the texts stay in Arrow, only the ids are hashed (from the Arrow buffers). Any other batch returns
None and the row-by-row reader decides (``readers.to_record``), so the two paths agree on every
row (``tests/test_readers.py``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

PLAIN_COLUMNS = {"prompt", "chosen", "rejected", "id"}


def contiguous(col) -> pa.Array:
    """One array of a column: its only chunk as is (``combine_chunks`` would copy it)."""
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _utf8_offsets(arr) -> tuple[pa.Buffer | None, np.ndarray]:
    """A string array's UTF-8 data buffer and its rows' byte offsets in it (numpy, no copy)."""
    _, offsets, data = arr.buffers()
    width = np.int64 if arr.type == pa.large_string() else np.int32
    return data, np.frombuffer(offsets, dtype=width)[arr.offset: arr.offset + len(arr) + 1]


def utf8_rows(arr) -> tuple[memoryview, list[int]]:
    """A string array's UTF-8 data buffer and the byte offsets of its rows in it (no copy): row i
    is ``data[off[i]:off[i + 1]]``."""
    data, off = _utf8_offsets(arr)
    return (memoryview(data) if data is not None else memoryview(b"")), off.tolist()


def row_ids(prompt, chosen, rejected) -> pa.Array:
    """``schema.row_id`` of every row, hashed from the UTF-8 bytes in the Arrow buffers (no nulls)."""
    (pd, po), (cd, co), (rd, ro) = (utf8_rows(a) for a in (prompt, chosen, rejected))
    sep, sha, ids = b"\x1f", hashlib.sha256, []
    for i in range(len(prompt)):  # the texts fed from the buffers in place (no joined copy)
        h = sha(pd[po[i]: po[i + 1]])
        h.update(sep)
        h.update(cd[co[i]: co[i + 1]])
        h.update(sep)
        h.update(rd[ro[i]: ro[i + 1]])
        h.update(sep)
        ids.append(h.hexdigest()[:16])
    return pa.array(ids, pa.string())


def maybe_blank(arr) -> np.ndarray:
    """Rows that might be empty or only whitespace (or are null): those not starting with an ASCII
    graphic character, read from the first byte in the Arrow buffer. The few it returns are checked
    in Python."""
    data, off = _utf8_offsets(arr)
    start, end = off[:-1], off[1:]
    out = start == end
    if data is not None and data.size:
        first = np.frombuffer(data, dtype=np.uint8)[np.minimum(start, data.size - 1)]
        out |= (first < 0x21) | (first > 0x7E)
    if arr.null_count:
        out |= arr.is_null().to_numpy(zero_copy_only=False)
    return out


def holding(arr, needle: str) -> np.ndarray:
    """Bool mask of the rows of a string array that contain ``needle`` (two or more bytes; nulls:
    False). The whole data buffer is searched with numpy first (its first two bytes side by side):
    when they occur nowhere, no row is looked at; else Arrow's ``match_substring`` decides. A
    batch of HH-length prompts: 0.05 µs per row without a hit, against 0.8 for the kernel alone."""
    raw = needle.encode()
    data, off = _utf8_offsets(arr)
    if data is not None and len(arr):
        a = np.frombuffer(data, dtype=np.uint8)[int(off[0]): int(off[-1])]
        if not ((a[:-1] == raw[0]) & (a[1:] == raw[1])).any():
            return np.zeros(len(arr), dtype=bool)
    return pc.fill_null(pc.match_substring(arr, needle), False).to_numpy(zero_copy_only=False)


def _blank(arr) -> bool:
    """Any response that is empty or only whitespace (Python's ``str.isspace``)?"""
    if arr.null_count:
        return True
    rows = np.flatnonzero(maybe_blank(arr))
    return any(not (v := arr[int(i)].as_py()) or v.isspace() for i in rows)


PLAIN_JSON = pa.schema([(k, pa.string()) for k in ("id", "prompt", "chosen", "rejected")])
_JSON_PARSE = pa_json.ParseOptions(explicit_schema=PLAIN_JSON, unexpected_field_behavior="error")


def plain_json_block(data: bytes, schema: pa.Schema, ends: list[int] | None = None):
    """A block of JSON lines of plain pairs (``data``: the lines joined by ``\\n``; ``ends``: the
    offset where each line ends, found when None) parsed at once by Arrow's JSON reader → a
    ``schema`` table, or None when any line might read differently from Python's ``json`` line by
    line (then the line reader decides): a line Arrow rejects (other keys, a non-string value, a
    duplicate key, a lone surrogate escape, bad JSON), bytes that are not UTF-8 (Arrow does not
    check them), a byte order mark first (Arrow skips it there, Python's ``json`` refuses it;
    Arrow refuses one anywhere else), a line holding two objects (the row count differs), or a
    row ``plain_pairs_table`` refuses (nulls, blanks, a conversation)."""
    if not data or data.startswith(b"\xef\xbb\xbf"):
        return None
    if ends is None:
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10).tolist() + [len(data)]
    rows = len(ends) - _blank_lines(data, ends)
    if not rows:
        return None
    try:
        table = pa_json.read_json(pa.py_buffer(data), parse_options=_JSON_PARSE,
                                  read_options=pa_json.ReadOptions(use_threads=False, block_size=len(data) + 1))
        table.validate(full=True)  # the UTF-8 of every string, which the parser does not check
    except pa.ArrowInvalid:
        return None
    if table.num_rows != rows:
        return None
    return plain_pairs_table(table, schema)


_SPACE = np.zeros(256, dtype=bool)
_SPACE[list(b" \t\n\r\x0b\x0c")] = True  # what ``bytes.strip`` removes


def _blank_lines(data: bytes, ends: list[int]) -> int:
    """How many of the lines are blank (empty or only ASCII whitespace: not rows). Only lines
    that are empty or start with whitespace are looked at in Python."""
    end = np.asarray(ends, dtype=np.int64)
    start = np.concatenate(([0], end[:-1] + 1))
    first = np.frombuffer(data, dtype=np.uint8)[np.minimum(start, len(data) - 1)]  # data is not empty
    suspect = np.flatnonzero((start == end) | _SPACE[first])
    return sum(1 for i in suspect.tolist() if not data[start[i]: end[i]].strip())


def plain_pairs_table(batch, schema: pa.Schema):
    """A ``RecordBatch`` / ``Table`` of plain pairs → a ``schema`` (``READ_SCHEMA``) table, or None
    when any row needs the row-by-row reader (other columns, non-string types, nulls, blanks)."""
    names = set(batch.schema.names)
    if not {"prompt", "chosen", "rejected"} <= names <= PLAIN_COLUMNS:
        return None
    cols = {k: batch.column(k) for k in names}
    if any(not (pa.types.is_string(c.type) or pa.types.is_large_string(c.type)) for c in cols.values()):
        return None
    cols = {k: contiguous(c).cast(pa.string()) for k, c in cols.items()}
    if cols["prompt"].null_count or _blank(cols["chosen"]) or _blank(cols["rejected"]):
        return None
    if holding(cols["prompt"], "[{").any():  # maybe a conversation's JSON
        return None
    n = len(cols["prompt"])
    ids = row_ids(cols["prompt"], cols["chosen"], cols["rejected"])
    if "id" in cols:  # a given non-empty id is kept
        given = cols["id"]
        ids = pc.if_else(pc.fill_null(pc.not_equal(given, ""), False), given, ids)
    return pa.table({"id": ids, "prompt": cols["prompt"], "chosen": cols["chosen"], "rejected": cols["rejected"],
                     "meta": pa.array(["{}"] * n, pa.string()), "_error": pa.nulls(n, pa.string())}, schema=schema)
