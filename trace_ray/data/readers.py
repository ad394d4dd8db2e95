"""Readers: preference data → canonical records (``trace_ray.data.schema``), in plain Python or on
Ray Data.

Where the data comes from (``trace_ray.data.sources.resolve_source``): a ``.jsonl`` / ``.json`` /
``.parquet`` / ``.arrow`` file (``.gz`` read transparently), a folder of them, a ``datasets``
``save_to_disk`` folder, or a Hugging Face hub id with ``split``. How a row becomes a record, per
``format`` (``pairs`` — TRL standard and conversational, ``implicit`` — TRL implicit prompt,
``pku``, ``hh``; ``auto`` detects from the first row's columns): ``trace_ray.data.formats``.
``keys`` renames the file's columns first (``{"prompt": "question", ...}``, the ``--prompt-key``
/ ``--chosen-key`` / ``--rejected-key`` flags).

Malformed input is never dropped: a line that is not UTF-8, not JSON (e.g. truncated), lacks a
field or has an empty response becomes a record with ``_error`` = ``"file:line: reason"``, which
triage files as ``unresolved``. Blank lines are not rows.

``iter_records`` is plain Python (tests, the single-process baseline, the server, the pre-flight
check); ``read_pairs`` is the same parsing inside Ray Data read tasks (one streaming task per file).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from trace_ray.data.formats import FORMATS, PKU_CHOSEN, format_of, map_columns, plain_pairs_record, to_record
from trace_ray.data.schema import CANONICAL
from trace_ray.data.sources import Source, resolve_source

READ_SCHEMA = pa.schema(list(CANONICAL) + [pa.field("_error", pa.string())])


# ---------------------------------------------------------------------------------------------
# files and raw objects


def _kind(name: str) -> str:
    n = name[:-3] if name.endswith(".gz") else name
    for ext in ("jsonl", "json", "parquet", "arrow"):
        if n.endswith("." + ext):
            return ext
    return "jsonl"


READ_BYTES = 1 << 20  # one read of a JSON-lines stream (a truncated .gz loses the read that fails)


def _line_chunks(stream) -> Iterator[list[bytes]]:
    """The raw lines of a binary stream, a list per ``READ_BYTES`` read (the last line may lack its ``\\n``)."""
    tail = b""
    while True:
        chunk = stream.read(READ_BYTES)
        if not chunk:
            break
        parts = (tail + chunk).split(b"\n")
        tail = parts.pop()
        yield parts
    if tail:
        yield [tail]


def _line_blocks(stream, rows: int, chunk_bytes: int = READ_BYTES) -> Iterator[tuple[int, bytes, list[int]]]:
    """Blocks of ``rows`` raw lines of a binary stream (the last block: the lines left), each
    ``(number of its first line, its lines joined by \\n, the offset where each line ends)``:
    one ``bytes`` per block, joined once from views of the reads, newlines found by
    ``bytes.find`` (no object per line). A read error ends the blocks with the complete lines read
    so far (as ``_lines`` with the same ``chunk_bytes``), then is raised."""
    pieces, size, ends, first, error = [], 0, [], 1, None  # size: bytes in pieces
    while True:
        try:
            chunk = stream.read(chunk_bytes)
        except READ_ERRORS as e:
            chunk, error = b"", e
        if not chunk:
            break
        view, start, find = memoryview(chunk), 0, chunk.find  # start: the first byte not in a block yet
        p = find(b"\n")
        while p >= 0:
            ends.append(size + p - start)
            if len(ends) == rows:
                pieces.append(view[start:p])
                yield first, b"".join(pieces), ends
                pieces, size, ends, first, start = [], 0, [], first + rows, p + 1
            p = find(b"\n", p + 1)
        pieces.append(view[start:])
        size += len(chunk) - start
    data = b"".join(pieces)
    if error is not None:  # the partial last line is lost, as in ``_lines``
        data = data[: ends[-1]] if ends else b""
    elif data.endswith(b"\n"):
        data = data[:-1]
    elif data:
        ends.append(len(data))
    if data or ends:  # the lines left; an empty last line counts too
        yield first, data, ends
    if error is not None:
        raise error


def _lines(stream) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of a binary stream."""
    lineno = 0
    for chunk in _line_chunks(stream):
        for raw in chunk:
            lineno += 1
            yield lineno, raw


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # the escape of a surrogate code point


def _half_surrogate(obj: dict) -> str | None:
    """Why a decoded row is not text, when an escape left half a surrogate pair alone in it
    (``"\\ud800"``: valid JSON, a Python string that no UTF-8 stage, Arrow included, can hold)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"an escape that is half a surrogate pair ({e.object[e.start]!a}), not text"
    return None


READ_ERRORS = (OSError, EOFError, pa.ArrowException, gzip.BadGzipFile)


def _broken(base: str, e: Exception) -> tuple[str, None, str]:
    """The row that records where a file broke off (the rows before it are kept)."""
    return f"{base}:end", None, f"file is truncated or corrupt: {type(e).__name__}: {e}"


def iter_objects(stream, name: str) -> Iterator[tuple[str, Any, str | None]]:
    """``(location, object or None, error or None)`` for each row of one file's binary stream."""
    base = os.path.basename(name)
    kind = _kind(name)
    try:
        if kind in ("parquet", "arrow"):
            i = 0
            seekable = getattr(stream, "seekable", lambda: False)()  # else the whole file (random access)
            for batch in columnar_batches(stream if seekable else stream.read(), kind):
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
                escapes = _SURROGATE.search(data) is not None
                for i, row in enumerate(obj, 1):
                    if not isinstance(row, dict):
                        yield f"{base}:item {i}", row, "item is not an object"
                    elif escapes and (err := _half_surrogate(row)):
                        yield f"{base}:item {i}", None, err
                    else:
                        yield f"{base}:item {i}", row, None
                return
            if isinstance(obj, dict) and not any(isinstance(v, (str, type(None))) for v in obj.values()):
                yield f"{base}", None, "a JSON object that is not a row; expected a list of rows or JSON lines"
                return
            stream = io.BytesIO(data)
        for lineno, raw in _lines(stream):
            item = _line_object(base, lineno, raw)
            if item is not None:
                yield item
    except READ_ERRORS as e:  # a truncated .gz or a corrupt parquet file: keep what was read
        yield _broken(base, e)


def _line_object(base: str, lineno: int, raw: bytes) -> tuple[str, Any, str | None] | None:
    """``(location, object or None, error or None)`` of one JSON line; None for a blank line."""
    loc = f"{base}:{lineno}"
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return loc, None, f"line {lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return loc, None, f"line {lineno}: invalid JSON (truncated line?): {e.msg} at column {e.colno}"
    if not isinstance(obj, dict):
        return loc, None, f"line {lineno}: expected a JSON object, got {type(obj).__name__}"
    if b"\\u" in raw and _SURROGATE.search(raw) and (err := _half_surrogate(obj)):
        return loc, None, f"line {lineno}: {err}"
    return loc, obj, None


def columnar_batches(source, kind: str, rows: int = 4096):
    """Record batches of a Parquet file or of an Arrow IPC file / stream (``datasets``'
    ``save_to_disk`` writes the stream format). ``source``: a seekable file (read a row group at a
    time) or the file's bytes."""
    if isinstance(source, bytes):
        source = pa.BufferReader(source)
    if kind == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(source).iter_batches(batch_size=rows)
        return
    try:
        stream = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_file(source)
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        return
    yield from stream


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


# ---------------------------------------------------------------------------------------------
# format detection, plain-Python iteration


def iter_raw(source: Source) -> Iterator[tuple[str, Any, str | None]]:
    """``(location, raw object or None, error or None)`` for every row of every file, in order."""
    for name in source.files:
        with _open(name) as f:
            yield from iter_objects(f, name)


def detect_format(data: str | Path | Source, keys: dict[str, str] | None = None, split: str | None = None) -> str:
    """``pairs`` | ``implicit`` | ``pku`` | ``hh`` from the first readable row (columns renamed by ``keys``)."""
    source = resolve_source(data, split)
    for _, obj, _ in iter_raw(source):
        if obj is None:
            continue
        fmt = format_of(map_columns(obj, keys, strict=False))
        if fmt:
            return fmt
        raise ValueError(
            f"{source.origin}: cannot detect the format from the columns {sorted(obj)}; pass --format "
            "pairs (prompt/chosen/rejected), implicit (chosen/rejected conversations), pku or hh, or name "
            "the columns with --prompt-key/--chosen-key/--rejected-key"
        )
    raise ValueError(f"{source.origin}: no readable row to detect the format from; pass --format")


def _check_args(fmt: str, pku_chosen: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if pku_chosen not in PKU_CHOSEN:
        raise ValueError(f"pku_chosen {pku_chosen!r} is not one of {', '.join(PKU_CHOSEN)}")


def iter_records(data: str | Path | Source, format: str = "auto", pku_chosen: str = "better", *,
                 split: str | None = None, keys: dict[str, str] | None = None) -> Iterator[dict]:
    """Canonical record dicts (``id, prompt, chosen, rejected, meta, _error``), plain Python."""
    _check_args(format, pku_chosen)
    source = resolve_source(data, split)
    fmt = detect_format(source, keys) if format == "auto" else format
    for loc, obj, err in iter_raw(source):
        yield to_record(obj, fmt, loc, err, pku_chosen, keys)


# ---------------------------------------------------------------------------------------------
# Ray Data


def _datasource_cls():
    from ray.data.datasource import FileBasedDatasource

    class PairsDatasource(FileBasedDatasource):
        """One read task per file, streaming blocks of canonical records (``READ_SCHEMA``)."""

        def __init__(self, paths, fmt: str, pku_chosen: str, keys: dict | None = None, rows_per_block: int = 4096, **kw):
            super().__init__(paths, **kw)
            self._fmt, self._pku_chosen, self._keys, self._rows = fmt, pku_chosen, keys, rows_per_block

        def _open_input_source(self, filesystem, path: str, **open_args):
            if _kind(path) in ("parquet", "arrow"):  # random access: a row group at a time
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        @property
        def _plain(self) -> bool:
            """Plain ``pairs`` without column mapping: the fast paths apply."""
            return self._fmt == "pairs" and not self._keys

        def _read_stream(self, f, path: str):
            if self._plain and _kind(path) in ("parquet", "arrow"):
                yield from self._columnar(f, path)
                return
            if self._plain and _kind(path) == "jsonl":
                yield from self._json_lines(f, path)
                return
            items: list = []
            for item in iter_objects(f, path):
                items.append(item)
                if len(items) >= self._rows:
                    yield self._table(items)
                    items = []
            if items:
                yield self._table(items)

        def _table(self, items: list) -> pa.Table:
            """``(location, object, error)`` items → a ``READ_SCHEMA`` table, one record each."""
            names = READ_SCHEMA.names
            cols: list[list] = [[] for _ in names]
            for loc, obj, err in items:
                rec = plain_pairs_record(obj) if self._plain and err is None else None
                if rec is None:
                    d = to_record(obj, self._fmt, loc, err, self._pku_chosen, self._keys)
                    rec = tuple(d[k] for k in names)
                for col, v in zip(cols, rec):
                    col.append(v)
            return pa.Table.from_arrays([pa.array(c, pa.string()) for c in cols], schema=READ_SCHEMA)

        def _json_lines(self, f, path: str):
            """Plain pairs in JSON lines, ``rows_per_block`` lines at a time: Arrow's JSON parser
            reads the block when every line in it is a plain row (``columnar.plain_json_block``
            says so); any other block is read line by line (``_line_object``, exactly
            ``iter_objects``: the same records, locations and errors)."""
            from trace_ray.data.columnar import plain_json_block

            base = os.path.basename(path)
            try:
                for first, data, ends in _line_blocks(f, self._rows):
                    table = plain_json_block(data, READ_SCHEMA, ends)
                    if table is None:
                        lines = enumerate(data.split(b"\n"), first)
                        table = self._table([it for n, raw in lines if (it := _line_object(base, n, raw)) is not None])
                    if table.num_rows:
                        yield table
            except READ_ERRORS as e:
                yield self._table([_broken(base, e)])

        def _columnar(self, f, path: str):
            """Parquet / Arrow pairs: a whole batch at once when it is plain, else row by row
            (exactly ``iter_objects`` + ``_table``, with the same locations and errors)."""
            from trace_ray.data.columnar import plain_pairs_table

            base, i = os.path.basename(path), 0
            try:
                for batch in columnar_batches(f, _kind(path), self._rows):
                    table = plain_pairs_table(batch, READ_SCHEMA)
                    if table is None:
                        table = self._table([(f"{base}:row {i + k + 1}", obj, None) for k, obj in enumerate(batch.to_pylist())])
                    i += batch.num_rows
                    yield table
            except READ_ERRORS as e:
                yield self._table([_broken(base, e)])

    return PairsDatasource


def read_pairs(data: str | Path | Source, format: str = "auto", pku_chosen: str = "better", rows_per_block: int = 4096,
               *, split: str | None = None, keys: dict[str, str] | None = None, ray_remote_args: dict | None = None):
    """A ``ray.data.Dataset`` of canonical records (columns of ``READ_SCHEMA``: the canonical ones
    plus ``_error``, null for good rows). Streams: nothing is collected on the driver.

    Several files: one read task per file, never split, so the operators after it fuse into that
    task (the rows of a file never travel through the object store). One file: Ray splits its
    output into blocks so that later operators still run in parallel. ``ray_remote_args`` go to
    the read tasks (e.g. ``max_retries``). Plain ``pairs`` rows skip the per-row dicts (JSON
    lines: blocks parsed by Arrow's JSON reader; Parquet / Arrow: whole batches;
    ``trace_ray.data.columnar``)."""
    import ray.data

    _check_args(format, pku_chosen)
    source = resolve_source(data, split)
    fmt = detect_format(source, keys) if format == "auto" else format
    datasource = _datasource_cls()(source.files, fmt=fmt, pku_chosen=pku_chosen, keys=keys, rows_per_block=rows_per_block)
    n = len(source.files)
    return ray.data.read_datasource(datasource, override_num_blocks=n if n > 1 else None,
                                    **({"ray_remote_args": ray_remote_args} if ray_remote_args else {}))
