"""Triage survives a lost worker and bad rows (issue 14): a Ray Data task process and an LLM-judge
actor are killed mid-run by their real pid (found among this test's own Ray processes by the
process title Ray gives a worker while it runs a task), and every input row still appears exactly
once in the output; mistyped metadata makes error verdicts, never a failed job."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter

import pytest

from conftest import ROOT
from test_triage_output import write_shards
from trace_ray.triage import run_triage
from trace_ray.triage_output import SUCCESS, read_triaged

HH_POLICY = ROOT / "configs/policies/hh_harmless_v2.yaml"
PKU_POLICY = ROOT / "configs/policies/pku_harm_v2.yaml"


class Killer(threading.Thread):
    """Kills, once, the first of this process's Ray workers whose title starts with ``title``
    (``ray::ReadPairs->...`` while it runs a read+rules task, ``ray::MapWorker(...)`` for a
    judge actor) once ``ready()`` is true. Only processes below this test process are looked at."""

    def __init__(self, title: str, ready=lambda: True):
        super().__init__(daemon=True)
        self.title, self.ready = title, ready
        self.killed: dict | None = None
        self.done = threading.Event()

    def run(self):
        import psutil

        me = psutil.Process()
        while not self.done.is_set() and self.killed is None:
            if self.ready():
                for p in me.children(recursive=True):
                    try:
                        title = (p.cmdline() or [""])[0]
                    except psutil.Error:
                        continue
                    if title.startswith(self.title):
                        os.kill(p.pid, signal.SIGKILL)
                        self.killed = {"pid": p.pid, "title": title, "at": time.time()}
                        break
            time.sleep(0.02)


def assert_every_row_once(out, prompts):
    table = read_triaged(out / "triaged.parquet")
    assert Counter(table.column("prompt").to_pylist()) == Counter(prompts)
    marker = json.loads((out / "triaged.parquet" / SUCCESS).read_text())
    assert marker["rows"] == len(prompts) == table.num_rows
    return table


@pytest.mark.slow
@pytest.mark.parametrize("title,files", [("ray::ReadPairs", 6), ("ray::Write", 1)])
def test_killed_task_worker(ray_session, tmp_path, title, files):
    """SIGKILL one task mid-run: with 6 input files the task that reads, files and writes one of
    them (the write fused into it); with 1 file a write task of its own. Ray retries it (the part
    file is rewritten under the same name), and the output holds every row exactly once."""
    prompts = write_shards(tmp_path / "data", 12_000, files, words=200)
    killer = Killer(title)
    killer.start()
    started = time.time()
    summary = run_triage(tmp_path / "data", HH_POLICY, tmp_path / "out", show_progress=False, batch_size=1000)
    killer.done.set()
    assert killer.killed and killer.killed["at"] < time.time(), "no task process was killed mid-run"
    assert killer.killed["at"] > started
    table = assert_every_row_once(tmp_path / "out", prompts)
    assert summary["total"] == len(prompts) and len(set(table.column("id").to_pylist())) == len(prompts)
    marker = json.loads((tmp_path / "out" / "triaged.parquet" / SUCCESS).read_text())
    if files > 1:  # fused: the killed task was also the writer, one part file per input file
        assert killer.killed["title"].endswith("->Write") and len(marker["files"]) == files
    else:  # write tasks of their own, about one block (1,000 rows) each
        assert len(marker["files"]) > files


@pytest.mark.slow
def test_killed_judge_actor(ray_session, tmp_path, tiny_model_dir):
    """SIGKILL the HF judge actor after it answered a first batch: Ray restarts it and retries
    its batch; every row is in the output exactly once (with the answers of a random tiny model,
    mostly unresolved — what is checked is that no row is lost or doubled)."""
    policy = {"name": "judge", "version": "1", "description": "no harm", "rules": [
        {"name": "kw", "kind": "keywords", "keywords": ["gun"]},
        {"name": "llm", "kind": "judge", "backend": "hf", "model": str(tiny_model_dir),
         "max_new_tokens": 24, "batch_size": 4, "concurrency": 1}]}
    prompts = write_shards(tmp_path / "data", 160, 2, words=12)
    out = tmp_path / "out"
    killer = Killer("ray::MapWorker", ready=lambda: (out / "triaged.parquet").exists()
                    and any(out.joinpath("triaged.parquet").glob("*.parquet")))
    killer.start()
    summary = run_triage(tmp_path / "data", policy, out, show_progress=False, batch_size=8)
    killer.done.set()
    assert killer.killed, "the judge actor was not killed mid-run"
    assert "HFJudge" in killer.killed["title"]
    assert_every_row_once(out, prompts)
    assert summary["total"] == len(prompts)


def test_mistyped_metadata_rows_do_not_stop_the_job(ray_session, tmp_path):
    """A number where the categories belong, a string severity, ``is_safe: "false"``: those
    responses get error verdicts with the reason (their pairs are unresolved); the rest is judged."""
    policy = {"name": "meta", "version": "1", "rules": [
        {"name": "cat", "kind": "meta", "harm_category": ["Privacy Violation"]},
        {"name": "sev", "kind": "meta", "severity_at_least": 2},
        {"name": "unsafe", "kind": "meta", "is_safe": False}]}
    good = {"harm_category": ["Privacy Violation"], "severity": 1, "is_safe": True}
    clean = {"harm_category": [], "severity": 0, "is_safe": True}
    rows = [
        {"chosen": {**good, "harm_category": 3}, "rejected": good},
        {"chosen": {**clean, "severity": "high"}, "rejected": good},
        {"chosen": good, "rejected": {**clean, "is_safe": "false"}},
        {"chosen": good, "rejected": clean},
    ]
    path = tmp_path / "meta.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "c", "rejected": "r", "meta": m}) + "\n"
                            for i, m in enumerate(rows)))
    summary = run_triage(path, policy, tmp_path / "out", format="pairs", show_progress=False)
    got = {r["prompt"]: r for r in read_triaged(tmp_path / "out" / "triaged.parquet").to_pylist()}
    assert summary["counts"] == {"invert": 1, "punish": 0, "retain": 0, "unresolved": 3}
    assert json.loads(got["p0"]["reasons"])["chosen"] == [
        "cat: response metadata 'harm_category' is 3, not a list of categories"]
    assert json.loads(got["p1"]["reasons"])["chosen"] == ["sev: response metadata 'severity' is 'high', not a number"]
    assert json.loads(got["p2"]["reasons"])["rejected"] == [
        "unsafe: response metadata 'is_safe' is 'false', not true or false"]
    assert got["p3"]["category"] == "invert"
