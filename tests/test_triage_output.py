"""Triage output written by Ray Data on the workers: a folder of part files + ``_SUCCESS``, the
summary merged from the write tasks, the driver holding no rows, URIs, sibling outputs by a split
column, and the folder read back by realign's data path (and an older single file too)."""

from __future__ import annotations

import json
import os
import random
import threading
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from trace_ray.config import ConfigError
from trace_ray.data.schema import TRIAGED
from trace_ray.triage import run_triage
from trace_ray.triage_output import SUCCESS, read_triaged, write_triaged

HH_POLICY = ROOT / "configs/policies/hh_harmless_v2.yaml"
WORDS = ("you can use a gun or a knife for that , but I would not . First , you take the tool then "
         "check it . 1. gather the parts 2. build it . Please ask a professional . ’ “ ” café").split()


def write_shards(folder, rows: int, shards: int, seed: int = 0, words: int = 60) -> list[str]:
    """``shards`` JSON-lines files of generated pairs; returns every row's prompt (for counting)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    prompts = []
    for k in range(shards):
        lines = []
        for i in range(k, rows, shards):
            p = f"question {i}?"
            resp = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, words))) for _ in range(2)]
            lines.append(json.dumps({"prompt": p, "chosen": resp[0], "rejected": resp[1]}))
            prompts.append(p)
        (folder / f"part-{k:03d}.jsonl").write_text("\n".join(lines) + "\n")
    return prompts


class DriverPeak:
    """Peak RSS (bytes) of this process while the block runs, sampled every 20 ms."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.base = self.proc.memory_info().rss

        def run():
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, self.proc.memory_info().rss)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.grew = max(self.peak, self.proc.memory_info().rss) - self.base
        return False


def test_folder_of_parts_success_marker_and_summary(ray_session, hh_path, tmp_path):
    summary = run_triage(hh_path, HH_POLICY, tmp_path, show_progress=False, batch_size=500)
    folder = tmp_path / "triaged.parquet"
    parts = sorted(p.name for p in folder.glob("*.parquet"))
    marker = json.loads((folder / SUCCESS).read_text())
    assert len(parts) > 1 and [f["file"] for f in marker["files"]] == parts and marker["rows"] == 2312
    assert sum(f["rows"] for f in marker["files"]) == 2312
    assert all(f["pid"] != os.getpid() for f in marker["files"])  # written by Ray workers, not the driver
    table = read_triaged(folder)
    assert table.schema.equals(TRIAGED) and table.num_rows == 2312
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["counts"] == dict(Counter(table.column("category").to_pylist()) | {
        c: 0 for c in ("invert", "punish", "retain", "unresolved") if c not in table.column("category").to_pylist()})
    assert {k: v["engine"] for k, v in summary["engines"].items()} == {
        "weapons_drugs": "re2", "theft_hacking": "re2", "profanity_insults": "re2", "step_by_step": "re2"}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert {_codec(folder / p) for p in parts} == {"SNAPPY"}
    # a second run replaces the first (no parts of the old run remain), in the codec asked for
    assert run_triage(hh_path, HH_POLICY, tmp_path, show_progress=False, compression="zstd")["compression"] == "zstd"
    assert read_triaged(folder).num_rows == 2312
    assert {_codec(p) for p in folder.glob("*.parquet")} == {"ZSTD"}
    with pytest.raises(ValueError, match="compression 'lzma' is not one of snappy, zstd"):
        run_triage(hh_path, HH_POLICY, tmp_path / "bad", show_progress=False, compression="lzma")
    assert not (tmp_path / "bad").exists()  # refused before any work


def _codec(path) -> str:
    """The Parquet codec of a part file's columns (all the same)."""
    meta = pq.ParquetFile(path).metadata
    (codec,) = {meta.row_group(g).column(c).compression for g in range(meta.num_row_groups) for c in range(meta.num_columns)}
    return codec


def test_one_fused_operator_runs_without_ray_datas_operator_reservation(ray_session):
    """Ray Data reserves resources per operator so that operators do not starve each other; a
    triage run that is one fused operator has no other to protect (with the reservation on, Ray
    Data ran its first task alone and paused between tasks): off for it, restored afterwards."""
    import ray.data

    from trace_ray.triage import _data_context

    ctx = ray.data.DataContext.get_current()
    before = ctx.op_resource_reservation_enabled
    with _data_context(False, one_operator=True):
        assert ctx.op_resource_reservation_enabled is False
    assert ctx.op_resource_reservation_enabled == before
    with _data_context(False):
        assert ctx.op_resource_reservation_enabled == before


@pytest.mark.slow
def test_driver_memory_does_not_grow_with_rows(ray_session, tmp_path):
    """40,000 pairs (~70 MB of text) against 2,000: the driver's peak RSS during triage stays
    within a few MB, because the rows go from the read tasks to the write tasks, never through it."""
    write_shards(tmp_path / "small", 2_000, 2)
    write_shards(tmp_path / "big", 40_000, 8, words=400)
    data_mb = sum(f.stat().st_size for f in (tmp_path / "big").iterdir()) / 2**20
    run_triage(tmp_path / "small", HH_POLICY, tmp_path / "warm", show_progress=False)  # imports, workers
    grew = {}
    for name in ("small", "big"):
        with DriverPeak() as mem:
            s = run_triage(tmp_path / name, HH_POLICY, tmp_path / f"out_{name}", show_progress=False)
        grew[name] = mem.grew / 2**20
        assert s["total"] == (2_000 if name == "small" else 40_000)
    assert data_mb > 60
    assert grew["big"] - grew["small"] < 25, (grew, data_mb)


def test_folder_is_read_back_by_realign_data_path(ray_session, tmp_path, tiny_model_dir):
    """Several part files → ``check_inputs`` / ``prepare_records`` (what ``train_local`` trains
    on) see every row once, in part order; a folder without ``_SUCCESS`` is refused; an older
    single ``triaged.parquet`` file still reads."""
    from trace_ray.config import from_dict
    from trace_ray.train.config import RunConfig
    from trace_ray.train.data import prepare_records
    from trace_ray.train.run import check_inputs

    write_shards(tmp_path / "data", 1_500, 3)
    s = run_triage(tmp_path / "data", HH_POLICY, tmp_path / "out", show_progress=False, batch_size=300,
                   compression="none")
    folder = tmp_path / "out" / "triaged.parquet"
    assert len(list(folder.glob("*.parquet"))) == 3  # the write fused into the read tasks: one part per input file
    assert {_codec(p) for p in folder.glob("*.parquet")} == {"UNCOMPRESSED"}
    cfg = from_dict(RunConfig, {"data": {"triaged": str(folder)}, "model": {"name": str(tiny_model_dir)},
                                "loss": {"alpha_kl": 0.0}, "output": {"dir": str(tmp_path / "run")}})
    info = check_inputs(cfg)
    assert info["counts"] == s["counts"] and info["rows"] == s["counts"]["invert"] + s["counts"]["punish"]
    rows = prepare_records(cfg)
    table = pq.read_table(folder)
    want = [r for r in table.select(["id", "category"]).to_pylist() if r["category"] in ("invert", "punish")]
    assert [{"id": r["id"], "category": r["category"]} for r in rows] == want
    single = tmp_path / "old" / "triaged.parquet"
    single.parent.mkdir()
    pq.write_table(table, single)
    assert check_inputs(cfg.__class__(**{**cfg.__dict__, "data": cfg.data.__class__(
        **{**cfg.data.__dict__, "triaged": str(single)})}))["counts"] == s["counts"]
    (folder / SUCCESS).unlink()
    with pytest.raises(ConfigError, match="_SUCCESS"):
        check_inputs(cfg)


def test_uri_output_and_sibling_outputs_by_split_column(ray_session, tmp_path):
    """``file://`` goes through the same filesystem resolution as ``s3://`` / ``gs://``; a split
    column routes rows to sibling outputs in the one pass, each with its summary and ``_SUCCESS``."""
    import ray.data

    from trace_ray.policy import load_policy
    from trace_ray.triage import TriageBatch

    write_shards(tmp_path / "data", 600, 2)
    s = run_triage(tmp_path / "data", HH_POLICY, f"file://{tmp_path}/uri_out", show_progress=False)
    assert read_triaged(tmp_path / "uri_out" / "triaged.parquet").num_rows == s["total"] == 600
    assert s["outputs"]["triaged"] == f"file://{tmp_path}/uri_out/triaged.parquet"

    from trace_ray.data.split import split_of

    policy = load_policy(HH_POLICY)
    table = read_triaged(tmp_path / "uri_out" / "triaged.parquet").select(["id", "prompt", "chosen", "rejected", "meta"])
    table = table.append_column("_error", pa.nulls(table.num_rows, pa.string()))
    ds = ray.data.from_arrow(table).map_batches(TriageBatch(policy, holdout=0.2), batch_format="pyarrow", batch_size=128)
    parts = write_triaged(ds, str(tmp_path / "split"), [r.name for r in policy.rules], split_column="split",
                          outputs={"train": "triaged.parquet", "heldout": "heldout.parquet"})
    train, held = (read_triaged(tmp_path / "split" / f) for f in ("triaged.parquet", "heldout.parquet"))
    want = Counter(split_of(p, i, 0.2) for p, i in zip(table.column("prompt").to_pylist(), table.column("id").to_pylist()))
    assert (train.num_rows, held.num_rows) == (want["train"], want["heldout"]) and want["heldout"] > 50
    assert sum(parts.summaries["train"].counts.values()) == want["train"]
    assert sum(parts.summaries["heldout"].counts.values()) == want["heldout"]
    assert set(train.column("id").to_pylist()).isdisjoint(held.column("id").to_pylist())
    assert "split" not in train.column_names and (tmp_path / "split" / "heldout.parquet" / SUCCESS).exists()


def test_write_is_fused_for_many_bounded_files_only(tmp_path, monkeypatch):
    """``fuse_write``: two or more files, each within the limit (a compressed one counted 4x) →
    write in the read tasks; one file, a bigger file or a path whose size is unknown → write tasks."""
    from trace_ray import triage_output
    from trace_ray.triage_output import fuse_write

    monkeypatch.setattr(triage_output, "FUSED_WRITE_MAX_FILE_BYTES", 1000)
    for name, size in (("a.jsonl", 900), ("b.jsonl", 1000), ("c.jsonl", 1001), ("d.jsonl.gz", 250), ("e.jsonl.gz", 251),
                       ("f.parquet", 251)):
        (tmp_path / name).write_bytes(b"x" * size)
    f = {n: str(tmp_path / n) for n in ("a.jsonl", "b.jsonl", "c.jsonl", "d.jsonl.gz", "e.jsonl.gz", "f.parquet")}
    assert fuse_write([f["a.jsonl"], f["b.jsonl"], f["d.jsonl.gz"]])
    assert not fuse_write([f["a.jsonl"]])
    assert not fuse_write([f["a.jsonl"], f["c.jsonl"]])
    assert not fuse_write([f["a.jsonl"], f["e.jsonl.gz"]]) and not fuse_write([f["a.jsonl"], f["f.parquet"]])
    assert not fuse_write([f["a.jsonl"], "s3://bucket/x.jsonl"])


def test_a_retried_write_task_rewrites_its_own_part(tmp_path, hh_path):
    """What a retry does (same write UUID, same task index, after the first attempt finished or
    died): one part file, its rows once; a dead attempt's temporary file is removed at the end."""
    from ray.data._internal.execution.interfaces import TaskContext
    from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME
    from ray.data.datasource.datasink import WriteResult

    from trace_ray.data.readers import READ_SCHEMA, iter_records
    from trace_ray.policy import load_policy
    from trace_ray.triage import triage_table
    from trace_ray.triage_output import triaged_sink

    policy = load_policy(HH_POLICY)
    rows = triage_table(policy, pa.Table.from_pylist(list(iter_records(hh_path))[:300], schema=READ_SCHEMA))
    sink = triaged_sink(str(tmp_path), {"all": "triaged.parquet"}, None, [r.name for r in policy.rules])
    sink.on_write_start()
    ctx = TaskContext(task_idx=7, op_name="Write", kwargs={WRITE_UUID_KWARG_NAME: "0123abcd-uuid"})
    sink.write([rows.slice(0, 150), rows.slice(150)], ctx)
    (tmp_path / "triaged.parquet" / ".part-0123abcd-000007.parquet.999.tmp").write_bytes(b"half a file")
    ret = sink.write([rows.slice(0, 150), rows.slice(150)], ctx)  # the retry
    sink.on_write_complete(WriteResult(num_rows=300, size_bytes=0, write_returns=[ret]))
    folder = tmp_path / "triaged.parquet"
    assert sorted(p.name for p in folder.iterdir()) == [SUCCESS, "part-0123abcd-000007.parquet"]
    assert read_triaged(folder).equals(rows)
    assert sink.result.summaries["all"].to_dict()["total"] == 300


def test_summary_counts_each_rule_named_in_the_reasons(hh_path):
    """The summary's per-rule hits (counted by Arrow's JSON reader over the reasons column) equal
    a count made row by row from the same reasons, also when a match text holds colons, quotes,
    backslashes or non-ASCII letters, and a row of two chunks (a table Ray joined)."""
    from trace_ray.data.readers import iter_records
    from trace_ray.policy import load_policy
    from trace_ray.triage import triage_records
    from trace_ray.triage_output import Summary, reason_kind

    policy = load_policy({"name": "odd", "version": 1, "rules": [
        {"name": "kw", "kind": "keywords", "keywords": ["a:b", 'say "hi"', "c\\d", "über", "gun"]},
        {"name": "re.x", "kind": "regex", "pattern": r"steal\S*"}]})
    texts = ["a:b here", 'they say "hi"', "c\\d", "Über alles", "a gun: steal:this", "fine", "steal"]
    rng = random.Random(5)
    records = [{"prompt": "p", "chosen": rng.choice(texts), "rejected": rng.choice(texts)} for _ in range(300)]
    records += list(iter_records(hh_path, "hh"))[:300]
    rows = triage_records(policy, records)
    table = pa.Table.from_pylist(rows, schema=TRIAGED)
    table = pa.concat_tables([table.slice(0, 250), table.slice(250)])
    got = Summary([r.name for r in policy.rules])
    got.add(table)
    want = {r.name: {"chosen": 0, "rejected": 0} for r in policy.rules}
    for row in rows:
        for side in ("chosen", "rejected"):
            if row[f"{side}_verdict"] == "non_compliant":
                for reason in json.loads(row["reasons"])[side]:
                    want[reason.split(":", 1)[0]][side] += 1
    assert got.hits == want
    assert all(v["chosen"] and v["rejected"] for v in want.values())
    unresolved = [r for r in rows if r["category"] == "unresolved"]
    assert unresolved and got.unresolved == Counter(reason_kind(r, json.loads(r["reasons"])) for r in unresolved)
    assert got.counts == Counter(r["category"] for r in rows)
