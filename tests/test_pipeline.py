"""Stage bookkeeping of trace_ray.pipeline and the filesystems of trace_ray.storage (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from trace_ray import storage
from trace_ray.config import ConfigError, from_dict
from trace_ray.pipeline import (
    EXIT_CONFIG, EXIT_FAILED, EXIT_MISSING, MARKER, ComponentMissing, PipelineConfig, content_id,
    exit_code_for, run_stage,
)


def test_storage_local_and_file_uris_round_trip(tmp_path):
    for base in (str(tmp_path / "a"), "file://" + str(tmp_path / "b")):
        uri = storage.join(base, "x", "y.json")
        assert not storage.is_remote(uri) and not storage.exists(uri)
        storage.write_json(uri, {"k": [1, 2]})
        assert storage.exists(uri) and storage.read_json(uri) == {"k": [1, 2]}
        storage.delete_dir(storage.join(base, "x"))
        assert not storage.exists(uri)
    assert storage.is_remote("s3://bucket/k") and storage.is_remote("gs://bucket/k")
    assert storage.join("s3://b/run/", "triage", "/x") == "s3://b/run/triage/x"


def test_storage_errors_name_the_uri(tmp_path):
    with pytest.raises(ValueError, match="nope://x"):
        storage.resolve("nope://x")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        storage.localize(str(tmp_path / "missing.jsonl"))


def test_staged_output_local_is_the_folder_and_upload_copies(tmp_path):
    with storage.staged_output(str(tmp_path / "out")) as d:
        assert d == str(tmp_path / "out")
        (tmp_path / "out" / "f.txt").write_text("hi")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "g.txt").write_text("there")
    storage.upload_dir(src, "file://" + str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "sub" / "g.txt").read_text() == "there"


def test_run_stage_writes_marker_skips_reruns_and_cleans(tmp_path):
    out = str(tmp_path / "stage")
    calls = []

    def work(local, uri):
        calls.append(local)
        (tmp_path / "stage" / f"out{len(calls)}.txt").write_text("x")
        return {"n": len(calls)}

    r1 = run_stage("s", out, "fp1", work, force=False)
    assert r1["status"] == "ran" and r1["result"] == {"n": 1}
    marker = json.loads((tmp_path / "stage" / MARKER).read_text())
    assert marker["fingerprint"] == "fp1" and marker["result"] == {"n": 1}
    r2 = run_stage("s", out, "fp1", work, force=False)
    assert r2["status"] == "skipped" and len(calls) == 1
    r3 = run_stage("s", out, "fp2", work, force=False)  # inputs changed: old outputs go first
    assert r3["status"] == "ran" and not (tmp_path / "stage" / "out1.txt").exists()
    assert (tmp_path / "stage" / "out2.txt").exists()


def test_failed_stage_leaves_no_marker(tmp_path):
    out = str(tmp_path / "stage")

    def boom(local, uri):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage("s", out, "fp", boom, force=False)
    assert not (tmp_path / "stage" / MARKER).exists()


def test_content_id_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same")
    b.write_text("same")
    assert content_id(str(a)) == content_id(str(b))
    b.write_text("different")
    assert content_id(str(a)) != content_id(str(b))


def test_pipeline_config_errors_name_the_field():
    base = {"out": "o", "data": "d", "policy": "p"}
    with pytest.raises(ConfigError, match=r"stages\[1\]"):
        from_dict(PipelineConfig, {**base, "stages": ["triage", "train"]})
    with pytest.raises(ConfigError, match="stages: must be a subset"):
        from_dict(PipelineConfig, {**base, "stages": ["realign", "triage"]})
    with pytest.raises(ConfigError, match="^policy: required"):
        from_dict(PipelineConfig, {"out": "o", "data": "d"})


def test_exit_codes():
    assert exit_code_for(ConfigError("x")) == EXIT_CONFIG
    assert exit_code_for(FileNotFoundError("x")) == EXIT_CONFIG
    assert exit_code_for(ComponentMissing("x")) == EXIT_MISSING
    assert exit_code_for(ModuleNotFoundError("vllm")) == EXIT_MISSING
    assert exit_code_for(RuntimeError("x")) == EXIT_FAILED
    from trace_ray.policy import PolicyError

    assert exit_code_for(PolicyError("x")) == EXIT_CONFIG


def _job(*args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_jobs_exit_2_on_bad_config_before_any_work(tmp_path, pku_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"data: {pku_path}\npolicy: {ROOT}/configs/policies/pku_harm_v2.yaml\nout: {tmp_path}/o\nstagez: []\n")
    r = _job("jobs/pipeline.py", "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    assert "stagez: unknown key" in r.stderr
    r = _job("jobs/pipeline.py", "--config", str(cfg).replace("p.yaml", "none.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    # a bad key in the realign section is reported before any stage starts
    cfg.write_text(f"data: {pku_path}\npolicy: {ROOT}/configs/policies/pku_harm_v2.yaml\nout: {tmp_path}/o\n"
                   "realign: {model: {name: m}, train: {batch_sise: 2}}\n")
    r = _job("jobs/pipeline.py", "--config", str(cfg), "--dry-run")
    assert r.returncode == 2 and "realign.train.batch_sise: unknown key" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    r = _job("jobs/triage.py", "--data", str(tmp_path / "nope.jsonl"), "--policy",
             f"{ROOT}/configs/policies/pku_harm_v2.yaml", "--out", str(tmp_path / "t"))
    assert r.returncode == 2 and "nope.jsonl" in r.stderr


def test_dry_run_plans_every_stage(tmp_path, pku_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"data: {pku_path}\nformat: pku\npolicy: {ROOT}/configs/policies/pku_harm_v2.yaml\n"
                   f"out: {tmp_path}/o\nrealign: {{model: {{name: m}}}}\n")
    r = _job("jobs/pipeline.py", "--config", str(cfg), "--dry-run")
    assert r.returncode == 2 and "set triage.holdout" in r.stderr, r.stderr  # evaluate needs a held-out split
    r = _job("jobs/pipeline.py", "--config", str(cfg), "--dry-run", "triage.holdout=0.2")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout[r.stdout.index("{"):])
    assert [s["status"] for s in report["stages"].values()] == ["planned"] * 4
