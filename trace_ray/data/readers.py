"""Readers: preference data in several layouts → canonical records (``trace_ray.data.schema``).

Formats (``format=``):
- ``pairs``: ``prompt`` / ``chosen`` / ``rejected`` (+ optional ``id``, ``meta``) in ``.jsonl``,
  ``.json`` (a list of objects), ``.parquet`` or a ``datasets`` ``save_to_disk`` folder (``.arrow``);
  ``.gz`` compression is read transparently.
- ``pku``: PKU-SafeRLHF's own columns. ``pku_chosen`` picks y_w: ``better`` (better_response_id, the
  dataset's own preference label; the default),
  ``safer`` (safer_response_id) or ``authors`` (the TRACE authors' rule: the safe response if
  exactly one is safe, else safer_response_id). Each response's own metadata goes to
  ``meta["chosen"]`` / ``meta["rejected"]`` as ``{"harm_category": [flagged names], "severity",
  "is_safe", "response_id", "source"}`` — what ``meta`` policy rules read.
- ``hh``: Anthropic HH-RLHF transcripts. The prompt is the shared prefix up to and including the
  last shared ``"\\n\\nAssistant:"``; the rest of each transcript (stripped) is the response. The
  turns of the prompt are kept as chat messages in ``meta["messages"]``.
- ``auto``: from the file's columns (response_0/response_1 → pku; prompt/chosen/rejected → pairs;
  chosen/rejected transcripts with "Assistant:" → hh).

Malformed input is never dropped: a line that is not UTF-8, not JSON (e.g. truncated), lacks a
field or has an empty response becomes a record with ``_error`` = the reason (and the file:line in
``meta["source"]``), which triage files as ``unresolved``. Blank lines are not rows.

``iter_records`` is plain Python (tests, the single-process baseline, the server);
``read_pairs`` is the same parsing inside Ray Data read tasks (one streaming task per file).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from trace_ray.data.schema import CANONICAL, row_id

FORMATS = ("auto", "pairs", "pku", "hh")
PKU_CHOSEN = ("authors", "better", "safer")
READ_SCHEMA = pa.schema(list(CANONICAL) + [pa.field("_error", pa.string())])
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".jsonl.gz", ".json.gz")
HH_MARKER = "\n\nAssistant:"


class BadRow(ValueError):
    """A row that cannot become a canonical record; the message is the ``_error`` reason."""


# ---------------------------------------------------------------------------------------------
# files and raw objects


def list_files(path: str | Path) -> list[str]:
    """The data files behind ``path`` (a file, a folder of data files, or a datasets folder)."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if not p.is_dir():
        raise FileNotFoundError(f"data path {p} does not exist")
    files = sorted(str(f) for f in p.rglob("*") if f.is_file() and str(f).endswith(DATA_SUFFIXES)
                   and not f.name.startswith((".", "_")) and f.name not in ("dataset_info.json", "state.json"))
    if not files:
        raise FileNotFoundError(f"no data files ({', '.join(DATA_SUFFIXES)}) under {p}")
    return files


def _kind(name: str) -> str:
    n = name[:-3] if name.endswith(".gz") else name
    for ext in ("jsonl", "json", "parquet", "arrow"):
        if n.endswith("." + ext):
            return ext
    return "jsonl"


def _lines(stream) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of a binary stream, read in 1 MiB chunks."""
    tail, lineno = b"", 0
    while True:
        chunk = stream.read(1 << 20)
        if not chunk:
            break
        parts = (tail + chunk).split(b"\n")
        tail = parts.pop()
        for raw in parts:
            lineno += 1
            yield lineno, raw
    if tail:
        yield lineno + 1, tail


def iter_objects(stream, name: str) -> Iterator[tuple[str, Any, str | None]]:
    """``(location, object or None, error or None)`` for each row of one file's binary stream."""
    base = os.path.basename(name)
    kind = _kind(name)
    try:
        if kind in ("parquet", "arrow"):
            i = 0
            for batch in columnar_batches(stream.read(), kind):
                for row in batch.to_pylist():
                    i += 1
                    yield f"{base}:row {i}", row, None
            return
        if kind == "json":
            data = stream.read()
            try:
                obj = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                obj = None  # maybe JSON lines in a .json file: fall through to the line reader
            if isinstance(obj, list):
                for i, row in enumerate(obj, 1):
                    yield f"{base}:item {i}", row, None if isinstance(row, dict) else "item is not an object"
                return
            if isinstance(obj, dict) and not any(isinstance(v, (str, type(None))) for v in obj.values()):
                yield f"{base}", None, "a JSON object that is not a row; expected a list of rows or JSON lines"
                return
            stream = io.BytesIO(data)
        for lineno, raw in _lines(stream):
            loc = f"{base}:{lineno}"
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield loc, None, f"line {lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})"
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield loc, None, f"line {lineno}: invalid JSON (truncated line?): {e.msg} at column {e.colno}"
                continue
            if not isinstance(obj, dict):
                yield loc, None, f"line {lineno}: expected a JSON object, got {type(obj).__name__}"
                continue
            yield loc, obj, None
    except (OSError, EOFError, pa.ArrowException, gzip.BadGzipFile) as e:
        # a truncated .gz or a corrupt parquet file: keep what was read, record where it broke
        yield f"{base}:end", None, f"file is truncated or corrupt: {type(e).__name__}: {e}"


def columnar_batches(data: bytes, kind: str, rows: int = 4096):
    """Record batches of a Parquet file or of an Arrow IPC file / stream (``datasets``'
    ``save_to_disk`` writes the stream format) held in ``data``."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=rows)
        return
    try:
        stream = pa.ipc.open_stream(pa.BufferReader(data))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.BufferReader(data))
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        return
    yield from stream


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


# ---------------------------------------------------------------------------------------------
# format detection and conversion


def detect_format(path: str | Path) -> str:
    """``pairs`` | ``pku`` | ``hh`` from the first readable row of the first file."""
    for name in list_files(path):
        with _open(name) as f:
            for _, obj, err in iter_objects(f, name):
                if obj is None:
                    continue
                fmt = format_of(obj)
                if fmt:
                    return fmt
                raise ValueError(
                    f"{name}: cannot detect the format from the columns {sorted(obj)}; "
                    "pass format= pairs (prompt/chosen/rejected), pku or hh"
                )
    raise ValueError(f"{path}: no readable row to detect the format from; pass format=")


def format_of(obj: dict) -> str | None:
    keys = set(obj)
    if {"response_0", "response_1"} <= keys:
        return "pku"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "pairs"
    if {"chosen", "rejected"} <= keys and "Assistant:" in str(obj.get("chosen")):
        return "hh"
    return None


def _text(obj: dict, key: str, response: bool = False) -> str:
    if key not in obj or obj[key] is None:
        raise BadRow(f"missing field {key!r}")
    v = obj[key]
    if not isinstance(v, str):
        raise BadRow(f"field {key!r} is not a string ({type(v).__name__})")
    if response and not v.strip():
        raise BadRow(f"empty response: {key!r}")
    return v


def _pairs(obj: dict) -> dict:
    prompt = _text(obj, "prompt")
    chosen, rejected = _text(obj, "chosen", True), _text(obj, "rejected", True)
    meta = obj.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = {"raw": meta}
    meta = dict(meta) if isinstance(meta, dict) else {}
    extra = {k: v for k, v in obj.items() if k not in ("id", "prompt", "chosen", "rejected", "meta")}
    if extra:
        meta.setdefault("fields", extra)
    rid = obj.get("id")
    return _record(prompt, chosen, rejected, meta, str(rid) if rid not in (None, "") else None)


def _pku_response(obj: dict, i: int) -> dict:
    cats = obj.get(f"response_{i}_harm_category")
    m: dict = {"response_id": i, "is_safe": obj.get(f"is_response_{i}_safe")}
    if isinstance(cats, dict):
        m["harm_category"] = [k for k, v in cats.items() if v]
    sev = obj.get(f"response_{i}_severity_level")
    if sev is not None:
        m["severity"] = sev
    if f"response_{i}_source" in obj:
        m["source"] = obj[f"response_{i}_source"]
    return m


def _pku(obj: dict, chosen_by: str) -> dict:
    prompt = _text(obj, "prompt")
    resp = [_text(obj, "response_0", True), _text(obj, "response_1", True)]
    safe = []
    for i in (0, 1):
        s = obj.get(f"is_response_{i}_safe")
        if not isinstance(s, bool):
            raise BadRow(f"missing field 'is_response_{i}_safe'")
        safe.append(s)

    def rid(key: str) -> int:
        v = obj.get(key)
        if v not in (0, 1) or isinstance(v, bool):
            raise BadRow(f"missing field {key!r} (0 or 1)")
        return v

    if chosen_by == "better":
        c = rid("better_response_id")
    elif chosen_by == "safer":
        c = rid("safer_response_id")
    else:  # TRACE authors: the safe one if exactly one is safe, else the safer one
        c = (0 if safe[0] else 1) if safe[0] != safe[1] else rid("safer_response_id")
    meta = {
        "source": "pku",
        "chosen_by": chosen_by,
        "chosen": _pku_response(obj, c),
        "rejected": _pku_response(obj, 1 - c),
        "better_response_id": obj.get("better_response_id"),
        "safer_response_id": obj.get("safer_response_id"),
        "prompt_source": obj.get("prompt_source"),
    }
    return _record(prompt, resp[c], resp[1 - c], meta)


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH transcripts → (prompt, chosen response, rejected response)."""
    common = os.path.commonprefix([chosen, rejected])
    idx = common.rfind(HH_MARKER)
    if idx < 0:
        raise BadRow("chosen and rejected share no '\\n\\nAssistant:' turn")
    cut = idx + len(HH_MARKER)
    return chosen[:cut], chosen[cut:].strip(), rejected[cut:].strip()


def hh_messages(prompt: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"`` → chat messages."""
    out = []
    for chunk in prompt.split("\n\n"):
        for tag, role in (("Human:", "user"), ("Assistant:", "assistant")):
            if chunk.startswith(tag):
                out.append({"role": role, "content": chunk[len(tag):].strip()})
                break
        else:
            if out and chunk:  # a paragraph break inside a turn
                out[-1]["content"] += "\n\n" + chunk
    if out and out[-1]["role"] == "assistant" and not out[-1]["content"]:
        out.pop()
    return out


def _hh(obj: dict) -> dict:
    prompt, chosen, rejected = split_hh(_text(obj, "chosen"), _text(obj, "rejected"))
    if not chosen:
        raise BadRow("empty response: 'chosen'")
    if not rejected:
        raise BadRow("empty response: 'rejected'")
    return _record(prompt, chosen, rejected, {"source": "hh", "messages": hh_messages(prompt)})


def _record(prompt, chosen, rejected, meta, rid=None, error=None) -> dict:
    return {
        "id": rid or row_id(prompt, chosen, rejected),
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "meta": json.dumps(meta, ensure_ascii=False, default=str),
        "_error": error,
    }


def plain_pairs_record(obj) -> tuple | None:
    """The fast case of the ``pairs`` format, as a tuple in ``READ_SCHEMA`` order: exactly the
    keys prompt / chosen / rejected (+ a non-empty string ``id``), all strings, both responses
    non-blank. None for anything else (then ``to_record`` decides). Equal to ``to_record`` on the
    rows it accepts (``tests/test_readers.py`` checks it)."""
    if type(obj) is not dict or not 3 <= len(obj) <= 4:
        return None
    p, c, r = obj.get("prompt"), obj.get("chosen"), obj.get("rejected")
    if type(p) is not str or type(c) is not str or type(r) is not str or not c or not r or c.isspace() or r.isspace():
        return None
    rid = obj.get("id")
    if len(obj) == 4 and (type(rid) is not str or not rid):
        return None
    return (rid or row_id(p, c, r), p, c, r, "{}", None)


def to_record(obj: dict | None, fmt: str, loc: str, error: str | None = None, pku_chosen: str = "better") -> dict:
    """One raw row → a canonical record; a bad row → a record with ``_error`` (never raises)."""
    if error is None:
        try:
            if fmt == "pku":
                return _pku(obj, pku_chosen)
            if fmt == "hh":
                return _hh(obj)
            return _pairs(obj)
        except BadRow as e:
            error = str(e)
    texts = []
    for key in ("prompt", "chosen", "rejected"):
        v = obj.get(key) if isinstance(obj, dict) else None
        texts.append(v if isinstance(v, str) else "")
    # the location is part of the id, so two broken lines never collide
    rid = row_id(loc, texts[0], "\x1f".join(texts[1:]))
    return _record(*texts, {"source": {"location": loc}}, rid, f"{loc}: {error}")


def _check_args(fmt: str, pku_chosen: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if pku_chosen not in PKU_CHOSEN:
        raise ValueError(f"pku_chosen {pku_chosen!r} is not one of {', '.join(PKU_CHOSEN)}")


def iter_records(path: str | Path, format: str = "auto", pku_chosen: str = "better") -> Iterator[dict]:
    """Canonical record dicts (``id, prompt, chosen, rejected, meta, _error``), plain Python."""
    _check_args(format, pku_chosen)
    fmt = detect_format(path) if format == "auto" else format
    for name in list_files(path):
        with _open(name) as f:
            for loc, obj, err in iter_objects(f, name):
                yield to_record(obj, fmt, loc, err, pku_chosen)


# ---------------------------------------------------------------------------------------------
# Ray Data


def _datasource_cls():
    from ray.data.datasource import FileBasedDatasource

    class PairsDatasource(FileBasedDatasource):
        """One read task per file, streaming blocks of canonical records (``READ_SCHEMA``)."""

        def __init__(self, paths, fmt: str, pku_chosen: str, rows_per_block: int = 4096, **kw):
            super().__init__(paths, **kw)
            self._fmt, self._pku_chosen, self._rows = fmt, pku_chosen, rows_per_block

        def _read_stream(self, f, path: str):
            if self._fmt == "pairs" and _kind(path) in ("parquet", "arrow"):
                yield from self._columnar(f, path)
                return
            names = READ_SCHEMA.names
            cols: list[list] = [[] for _ in names]
            plain = self._fmt == "pairs"
            for loc, obj, err in iter_objects(f, path):
                rec = plain_pairs_record(obj) if plain and err is None else None
                if rec is None:
                    d = to_record(obj, self._fmt, loc, err, self._pku_chosen)
                    rec = tuple(d[k] for k in names)
                for col, v in zip(cols, rec):
                    col.append(v)
                if len(cols[0]) >= self._rows:
                    yield pa.Table.from_arrays([pa.array(c, pa.string()) for c in cols], schema=READ_SCHEMA)
                    cols = [[] for _ in names]
            if cols[0]:
                yield pa.Table.from_arrays([pa.array(c, pa.string()) for c in cols], schema=READ_SCHEMA)

        def _columnar(self, f, path: str):
            """Parquet / Arrow pairs: a whole batch at once when it is plain, else row by row
            (exactly ``iter_objects`` + ``to_record``, with the same locations and errors)."""
            from trace_ray.data.columnar import plain_pairs_table

            base, i = os.path.basename(path), 0
            try:
                for batch in columnar_batches(f.read(), _kind(path), self._rows):
                    table = plain_pairs_table(batch, READ_SCHEMA)
                    if table is None:
                        table = pa.Table.from_pylist([to_record(obj, "pairs", f"{base}:row {i + k + 1}")
                                                      for k, obj in enumerate(batch.to_pylist())], schema=READ_SCHEMA)
                    i += batch.num_rows
                    yield table
            except (OSError, EOFError, pa.ArrowException) as e:
                err = f"file is truncated or corrupt: {type(e).__name__}: {e}"
                yield pa.Table.from_pylist([to_record(None, "pairs", f"{base}:end", err)], schema=READ_SCHEMA)

    return PairsDatasource


def read_pairs(path: str | Path, format: str = "auto", pku_chosen: str = "better", rows_per_block: int = 4096,
               ray_remote_args: dict | None = None):
    """A ``ray.data.Dataset`` of canonical records (columns of ``READ_SCHEMA``: the canonical ones
    plus ``_error``, null for good rows). Streams: nothing is collected on the driver.

    Several files: one read task per file, never split, so the operators after it fuse into that
    task (the rows of a file never travel through the object store). One file: Ray splits its
    output into blocks so that later operators still run in parallel. ``ray_remote_args`` go to
    the read tasks (e.g. ``max_retries``)."""
    import ray.data

    _check_args(format, pku_chosen)
    fmt = detect_format(path) if format == "auto" else format
    files = list_files(path)
    source = _datasource_cls()(files, fmt=fmt, pku_chosen=pku_chosen, rows_per_block=rows_per_block)
    return ray.data.read_datasource(source, override_num_blocks=len(files) if len(files) > 1 else None,
                                    **({"ray_remote_args": ray_remote_args} if ray_remote_args else {}))
