"""The triaged dataset on storage: written by the Ray Data workers, read by every later stage.

``OUT/triaged.parquet`` is a FOLDER of Parquet part files (Spark-style: the name stays so every
``OUT/triaged.parquet`` path keeps working) plus ``_SUCCESS``, written last; ``OUT`` may be a
local folder or an ``s3://`` / ``gs://`` URI (``trace_ray.storage`` resolves the filesystem).

Writing (:func:`write_triaged`): a Ray Data ``Datasink`` (:func:`triaged_sink`, Ray's
``ParquetDatasink`` with a streaming ``write``). Each write task — or each read task, when the
write is fused into it (:func:`fuse_write`) — streams its blocks into ONE part file named by Ray's
write UUID and the task index — a retried task (a lost worker) rewrites the same
file, so no row is ever written twice — through a hidden temporary name renamed at the end on a
local disk (object stores publish a PUT atomically). Each task also returns the summary of the rows
it wrote (:class:`Summary`, a few kB whatever the row count); Ray hands those to the driver in
``WriteResult.write_returns`` and :func:`write_triaged` merges them: the driver never holds a row.
An optional split column routes rows into sibling outputs in the same pass
(``outputs={"train": "triaged.parquet", "heldout": "heldout.parquet"}``).

Reading: :func:`read_triaged` (a ``pyarrow.Table``, optionally some columns) and
:func:`triaged_path` (the path to hand to ``ray.data.read_parquet`` / ``pyarrow``) accept a folder
(refused without ``_SUCCESS``: an interrupted triage) or an older single ``triaged.parquet`` file.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from trace_ray import storage
from trace_ray.data.schema import CATEGORIES, TRIAGED

SUCCESS = "_SUCCESS"
PLAIN_REASONS = '{"chosen": [], "rejected": []}'
EXAMPLES_PER_CATEGORY = 3
WRITE_TASK_MEMORY = 512 << 20  # logical reservation of one write task (Ray scheduling only)
# Parquet dictionary encoding where values repeat; the texts and ids are (nearly) all distinct, and
# trying a dictionary on them first costs about as much as the rest of the write
DICTIONARY_COLUMNS = ["meta", "chosen_verdict", "rejected_verdict", "reasons", "category", "policy"]
# Parquet codecs of the part files. Per 200-2,000-character row, one process: snappy 7 µs of the
# write's 9 (Ray's and pyarrow's default), none 0 for a 1.7x larger file, zstd about as long as
# snappy for a 38 % smaller one, gzip 4x slower (docs/triage.md "Benchmark").
COMPRESSIONS = ("snappy", "zstd", "lz4", "gzip", "brotli", "none")


def check_compression(compression: str) -> None:
    """A ``ValueError`` naming the choices unless ``compression`` is one of ``COMPRESSIONS``."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")


# ---------------------------------------------------------------------------------------------
# the summary: partial per write task, merged on the driver


class Summary:
    """Counts, verdicts, per-rule hits, unresolved reasons and a few examples of triaged rows.

    ``add(table)`` on a ``TRIAGED`` batch (Arrow kernels; only rows with a verdict other than
    compliant have their reasons parsed); ``merge(other)``; ``to_dict()``. Small and picklable:
    a write task returns one.
    """

    def __init__(self, rule_names: list[str], examples: int = EXAMPLES_PER_CATEGORY):
        self.counts: Counter = Counter({c: 0 for c in CATEGORIES})
        self.verdicts = {"chosen": Counter(), "rejected": Counter()}
        self.hits = {name: {"chosen": 0, "rejected": 0} for name in rule_names}
        self.unresolved: Counter = Counter()
        self.examples: dict[str, list] = {c: [] for c in CATEGORIES}
        self.k = examples

    def add(self, table) -> None:
        import pyarrow.compute as pc

        for key, col in (("category", None), ("chosen", "chosen_verdict"), ("rejected", "rejected_verdict")):
            for item in pc.value_counts(table[col or key]).to_pylist():
                (self.counts if col is None else self.verdicts[key])[item["values"]] += item["counts"]
        for side in ("chosen", "rejected"):  # the rules named in the reasons of a non-compliant side
            flagged = table["reasons"].filter(pc.equal(table[f"{side}_verdict"], "non_compliant"))
            for name, k in _named_rules(flagged, side).items():
                if name in self.hits:
                    self.hits[name][side] += k
        unresolved = table.select(["chosen_verdict", "rejected_verdict", "reasons"]).filter(
            pc.equal(table["category"], "unresolved"))  # selected first: the filter copies no text
        for row in unresolved.to_pylist():
            self.unresolved[reason_kind(row, json.loads(row["reasons"]))] += 1
        for c in CATEGORIES:  # the first few rows of each category, with their texts
            if len(self.examples[c]) < self.k:
                first = pc.indices_nonzero(pc.equal(table["category"], c))[: self.k - len(self.examples[c])]
                for row in (table.slice(i, 1).to_pylist()[0] for i in first.to_pylist()):  # no take: it
                    # would join the chunks of every column, texts included
                    self._example(row, json.loads(row["reasons"]) if row["reasons"] != PLAIN_REASONS else {})

    def _example(self, row: dict, reasons: dict) -> None:
        from trace_ray.chat import transcript

        if len(self.examples[row["category"]]) < self.k:
            ex = {k: _short(row[k]) for k in ("id", "chosen", "rejected")}
            prompt = transcript(row["prompt"])  # a conversation as text; its end is what matters
            ex["prompt"] = prompt if len(prompt) <= 200 else "…" + prompt[-200:]
            ex["verdicts"] = [row["chosen_verdict"], row["rejected_verdict"]]
            ex["reasons"] = reasons
            self.examples[row["category"]].append(ex)

    def merge(self, other: "Summary") -> "Summary":
        self.counts.update(other.counts)
        for s in ("chosen", "rejected"):
            self.verdicts[s].update(other.verdicts[s])
        for name, h in other.hits.items():
            for s in ("chosen", "rejected"):
                self.hits.setdefault(name, {"chosen": 0, "rejected": 0})[s] += h[s]
        self.unresolved.update(other.unresolved)
        for c in CATEGORIES:
            self.examples[c] = (self.examples[c] + other.examples[c])[: self.k]
        return self

    def to_dict(self) -> dict:
        total = sum(self.counts.values())
        return {
            "total": total,
            "counts": {c: self.counts[c] for c in CATEGORIES},
            "fractions": {c: round(self.counts[c] / total, 4) if total else 0.0 for c in CATEGORIES},
            "verdicts": {s: {v: self.verdicts[s][v] for v in ("compliant", "non_compliant", "error")}
                         for s in ("chosen", "rejected")},
            "rule_hits": self.hits,
            "unresolved_reasons": dict(self.unresolved.most_common()),
            "examples": self.examples,
        }


def _named_rules(reasons, side: str) -> dict[str, int]:
    """Rule name → in how many of these ``reasons`` (JSON text per row) ``side``'s list names it
    (a reason reads ``"name: detail"``). Parsed by Arrow's JSON reader, not row by row."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    if len(reasons) == 0:
        return {}
    data = "\n".join(reasons.to_pylist()).encode()
    lists = pj.read_json(pa.py_buffer(data), read_options=pj.ReadOptions(use_threads=False, block_size=len(data) + 1),
                         parse_options=pj.ParseOptions(explicit_schema=pa.schema([(side, pa.list_(pa.string()))]),
                                                       unexpected_field_behavior="ignore"))[side]
    names = pc.list_element(pc.split_pattern(pc.list_flatten(lists), ":", max_splits=1), 0)
    return {item["values"]: item["counts"] for item in pc.value_counts(names).to_pylist()}


def reason_kind(row: dict, reasons: dict) -> str:
    """A short, countable reason for an unresolved row (no row-specific text)."""
    if "error" in reasons:
        msg = reasons["error"].split(": ", 1)[-1]  # drop the file:line location
        if msg.startswith("line "):
            msg = msg.split(": ", 1)[-1]
        return msg.split(" (byte")[0].split(": ")[0].split(" at column")[0]
    for side in ("chosen", "rejected"):
        if row[f"{side}_verdict"] == "error" and reasons.get(side):
            r = reasons[side][0]
            if "neither yes nor no" in r:  # drop the answer text, which differs per row
                r = r.split(" nor no")[0] + " nor no"
            return f"{side}: {r[:100]}"
    return "unknown"


def _short(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "…"


# ---------------------------------------------------------------------------------------------
# writing


@dataclass
class Written:
    """What ``write_triaged`` returns: the merged :class:`Summary` per output key, and the merged
    ``extra`` accumulator (or None)."""

    summaries: dict[str, Summary]
    extra: Any = None


def triaged_sink(out_dir: str, outputs: dict[str, str], split_column: str | None, rule_names: list[str],
                 extra: Callable[[], Any] | None = None, compression: str = "snappy"):
    """A Ray Data ``Datasink`` writing ``TRIAGED`` rows under ``out_dir``: one part file per write
    task and output, named by Ray's write UUID and task index (idempotent under retries)."""
    import pyarrow.parquet as pq
    from ray.data._internal.datasource.parquet_datasink import ParquetDatasink
    from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME
    from ray.data.block import BlockAccessor

    class TriagedSink(ParquetDatasink):
        def __init__(self):
            fs, root = storage.resolve(out_dir)
            super().__init__(root, filesystem=fs, try_create_dir=True)
            self.root, self.fs, self.remote = root, fs, storage.is_remote(out_dir)
            self.result: Written | None = None
            self.rows = 0

        def on_write_start(self, schema=None) -> None:
            for folder in outputs.values():  # a fresh run replaces an earlier output
                path = f"{self.root}/{folder}"
                if self.fs.get_file_info(path).type.name != "NotFound":
                    self.fs.delete_dir(path)
                self.fs.create_dir(path, recursive=True)

        def write(self, blocks, ctx) -> dict:
            import socket

            name = f"part-{ctx.kwargs[WRITE_UUID_KWARG_NAME][:8]}-{ctx.task_idx:06d}.parquet"
            writers: dict[str, Any] = {}
            summaries = {key: Summary(rule_names) for key in outputs}
            more = extra() if extra is not None else None
            try:
                for block in blocks:
                    table = BlockAccessor.for_block(block).to_arrow()
                    if more is not None:
                        more.add(table)
                    for key, part in _split(table, split_column, outputs):
                        part = part.select(TRIAGED.names).cast(TRIAGED)
                        if key not in writers:
                            writers[key] = self._open(outputs[key], name)
                        writers[key][0].write_table(part)
                        summaries[key].add(part)
            finally:
                for writer, stream, _tmp, _final in writers.values():
                    writer.close()
                    stream.close()
            for _w, _s, tmp, final in writers.values():
                if tmp != final:
                    self.fs.move(tmp, final)  # a retried task replaces the same name
            who = {"pid": os.getpid(), "host": socket.gethostname()}
            files = [{"output": key, "file": name, "rows": sum(summaries[key].counts.values()), **who} for key in writers]
            return {"summaries": summaries, "files": files, "extra": more}

        def _open(self, folder: str, name: str):
            final = f"{self.root}/{folder}/{name}"
            tmp = final if self.remote else f"{self.root}/{folder}/.{name}.{os.getpid()}.tmp"
            stream = self.fs.open_output_stream(tmp)
            return pq.ParquetWriter(stream, TRIAGED, compression=compression, use_dictionary=DICTIONARY_COLUMNS), stream, tmp, final

        def on_write_complete(self, write_result) -> None:
            merged = {key: Summary(rule_names) for key in outputs}
            files: dict[str, list] = {key: [] for key in outputs}
            more = extra() if extra is not None else None
            for ret in write_result.write_returns:
                for key, s in (ret or {}).get("summaries", {}).items():
                    merged[key].merge(s)
                for f in (ret or {}).get("files", []):
                    files[f["output"]].append({k: v for k, v in f.items() if k != "output"})
                if more is not None and (ret or {}).get("extra") is not None:
                    more.merge(ret["extra"])
            self.result = Written(merged, more)
            for key, folder in outputs.items():
                _clean_tmp(self.fs, f"{self.root}/{folder}")
                if not _part_names(self.fs, f"{self.root}/{folder}"):  # no rows: still a readable schema
                    with self.fs.open_output_stream(f"{self.root}/{folder}/part-empty.parquet") as f:
                        pq.write_table(TRIAGED.empty_table(), f)
                storage.write_json(storage.join(out_dir, folder, SUCCESS), {
                    "rows": sum(merged[key].counts.values()),
                    "files": sorted(files[key], key=lambda f: f["file"]),  # with the writer's pid and host
                    "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                })

    return TriagedSink()


def _split(table, split_column: str | None, outputs: dict[str, str]):
    """(output key, rows) pairs of one block: all rows to the only output, or routed by the split
    column (a value that is not an output key is an error, never a silently dropped row)."""
    import pyarrow.compute as pc

    if split_column is None:
        (key,) = outputs
        yield key, table
        return
    values = set(pc.unique(table[split_column]).to_pylist())
    unknown = values - set(outputs)
    if unknown:
        raise ValueError(f"split column {split_column!r} has value(s) {sorted(map(str, unknown))} "
                         f"that are not outputs ({', '.join(outputs)})")
    for key in outputs:
        if key in values:
            yield key, table.filter(pc.equal(table[split_column], key))


def _part_names(fs, folder: str) -> list[str]:
    import pyarrow.fs as pafs

    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
            if i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))]


def _clean_tmp(fs, folder: str) -> None:
    """Temporary files of attempts that died mid-write (their task was retried under the final name)."""
    import pyarrow.fs as pafs

    for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        if info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
            fs.delete_file(info.path)


def write_triaged(ds, out_dir: str, rule_names: list[str], *, outputs: dict[str, str] | None = None,
                  split_column: str | None = None, ray_remote_args: dict | None = None,
                  extra: Callable[[], Any] | None = None, fused: bool = False, compression: str = "snappy") -> Written:
    """Write a dataset of ``TRIAGED`` rows (plus ``split_column`` when given) under ``out_dir``;
    return :class:`Written` (the merged :class:`Summary` per output key). ``outputs`` maps a split
    value to a folder name (default ``{"train": "triaged.parquet"}``: every row in
    ``OUT/triaged.parquet``). ``extra()`` makes one more accumulator per write task (``add(block)``
    on every whole block, ``merge(other)``), e.g. the ``--compare`` movement table.

    ``fused=True``: the write runs inside the tasks that make the rows (``ray_remote_args`` must
    equal theirs), one part file per task — what ``run_triage`` does for inputs of many bounded
    files (:func:`fuse_write`). Otherwise the write is an operator of its own, one block per task.
    ``compression``: the part files' Parquet codec, one of ``COMPRESSIONS``."""
    check_compression(compression)
    outputs = outputs or {"train": "triaged.parquet"}
    sink = triaged_sink(str(out_dir), outputs, split_column, rule_names, extra, compression)
    # A memory reservation of its own (a worker plus one block, its Parquet encoding and summary)
    # keeps the write a separate operator; without it Ray fuses the write into the task before.
    args = dict(ray_remote_args or {}) if fused else {"memory": WRITE_TASK_MEMORY, **(ray_remote_args or {})}
    ds.write_datasink(sink, ray_remote_args=args)
    return sink.result


FUSED_WRITE_MAX_FILE_BYTES = 256 << 20  # on disk; a compressed file (.gz, Parquet) counts 4x


def fuse_write(files: list[str]) -> bool:
    """Whether triage writes inside its read tasks (one task = one input file: read, rules, write)
    rather than in write tasks of their own. Fused is faster: no block goes through the object store,
    and on a small cluster every CPU reads — Ray Data reserves at least one CPU per operator, so with
    a separate write operator a 2-CPU machine runs one read task at a time. But Ray's write step
    holds every block of its task until the task ends, i.e. a whole input file's rows. So: fused
    for two or more files of at most ``FUSED_WRITE_MAX_FILE_BYTES`` each; a single file (one task
    would do everything on one CPU) or a bigger one keeps the separate write operator (its blocks
    are written in parallel, one at a time each)."""
    if len(files) < 2:
        return False
    for f in files:
        try:
            size = os.path.getsize(f)
        except OSError:  # not a local path: size unknown, stay bounded
            return False
        if size * (4 if f.endswith((".gz", ".parquet")) else 1) > FUSED_WRITE_MAX_FILE_BYTES:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# reading


def triaged_path(path: str | os.PathLike) -> str:
    """``path`` checked as a Parquet table to read: a file, or a folder — refused when it holds
    triage part files (``part-*.parquet``) but no ``_SUCCESS`` (the triage that wrote it did not
    finish). Raises ``FileNotFoundError`` / ``ValueError`` saying what is wrong."""
    p = Path(path)
    if p.is_file():
        return str(p)
    if not p.is_dir():
        raise FileNotFoundError(f"{p} does not exist (run `trace-ray triage` first)")
    if not (p / SUCCESS).exists() and any(p.glob("part-*.parquet")):
        raise ValueError(f"{p} has no {SUCCESS} marker: the triage that wrote it did not finish "
                         "(run it again)")
    return str(p)


def read_triaged(path: str | os.PathLike, columns: list[str] | None = None):
    """The rows of a triage output (folder of part files, in part order, or a single file) as
    one ``pyarrow.Table``."""
    import pyarrow.parquet as pq

    return pq.read_table(triaged_path(path), columns=columns)


def read_triaged_schema(path: str | os.PathLike):
    import pyarrow.parquet as pq

    p = triaged_path(path)
    return pq.read_schema(p) if Path(p).is_file() else pq.ParquetDataset(p).schema
