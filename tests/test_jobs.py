"""`ray job submit` of jobs/pipeline.py against a real Ray head started with `ray start --head`.

The head runs in its own process group, on free ports of 127.0.0.1, with its own temp dir, so it
never meets the session-wide `ray_session` instance of the same pytest run. Ray 2.60 turns token
auth on for local clusters; the CLI only sends the token (~/.ray/auth_token) when
RAY_AUTH_MODE=token, so the head and every CLI call get that variable. Finished stages are skipped
on the second submission (their _DONE.json markers are untouched).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from ray_nodes import RAY, RayNode, ray_env, wait_for_checkpoint

STAGES = ["triage", "realign", "evaluate"]  # serve_check: tests/test_real_model.py


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head (`ray start --head`) with the job server, of its own (tests/ray_nodes.py)."""
    head = RayNode(num_cpus=2, dashboard=True)
    try:
        head.wait_dashboard()
        yield head.dashboard
    finally:
        head.kill(signal.SIGTERM)
        shutil.rmtree(head.temp, ignore_errors=True)


def _submit(address: str, job_id: str, config: Path, wait: bool = True) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", str(ROOT),
           "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), *([] if wait else ["--no-wait"]), "--",
           "python", "jobs/pipeline.py", "--config", str(config)]
    return subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=900)


def _status(address: str, job_id: str) -> str:
    """The job's final status as `ray job status` prints it ("Job 'x' succeeded")."""
    r = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=ray_env(),
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    m = re.search(rf"Job '{re.escape(job_id)}' (succeeded|failed|was stopped)", out)
    if m:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[m.group(1)]
    m = re.search(r"status for job '[^']+': (\w+)", out, re.I)
    return m.group(1) if m else out


def _submit_ok(address: str, job_id: str, config: Path, out: Path) -> tuple[list[str], str, float]:
    """Submit and wait; the stage statuses of OUT/pipeline.json, the job's output, the seconds."""
    t0 = time.time()
    r = _submit(address, job_id, config)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert _status(address, job_id) == "SUCCEEDED"
    report = json.loads((out / "pipeline.json").read_text())
    return [report["stages"][s]["status"] for s in STAGES], r.stdout, time.time() - t0


def _markers(out: Path) -> dict:
    return {s: (out / s / "_DONE.json").stat().st_mtime_ns for s in STAGES}


def test_pipeline_job_stopped_then_resubmitted_runs_no_stage_twice(ray_head, tmp_path, tiny_model_dir, pku_path):
    """The first submission's driver is stopped (`ray job stop`) during realign, after Ray Train
    registered a checkpoint. The resubmission skips triage (its marker untouched), resumes realign
    from that checkpoint (the steps before it are not trained again) and runs evaluate; a third
    submission skips every stage."""
    out = tmp_path / "run"
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(f"""
name: jobs-test
data: {pku_path}
format: pku
policy: {ROOT}/configs/policies/pku_harm_v2.yaml
out: {out}
stages: [triage, realign, evaluate]
triage: {{pku_chosen: better, holdout: 0.3}}
realign:
  model: {{name: {tiny_model_dir}, lora: {{enabled: true, r: 4, alpha: 8}}}}
  reference: {{mode: adapter_disabled}}
  impact: {{weights: uniform}}
  train: {{batch_size: 8, max_steps: 8, checkpoint_every: 2}}
  data: {{max_length: 96}}
  logging: {{progress: false}}
evaluate: {{batch_size: 16, max_length: 96, max_prompts: 2, num_samples: 1, max_new_tokens: 8}}
""")
    t0 = time.time()
    r = _submit(ray_head, "trace-ray-jobs-test-1", cfg, wait=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    at = wait_for_checkpoint(out / "realign" / "ray_train",
                             lambda: _status(ray_head, "trace-ray-jobs-test-1") in ("PENDING", "RUNNING"))
    triage_marker = (out / "triage" / "_DONE.json").stat().st_mtime_ns
    r = subprocess.run([RAY, "job", "stop", "--address", ray_head, "trace-ray-jobs-test-1"], env=ray_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _status(ray_head, "trace-ray-jobs-test-1") == "STOPPED"
    assert at < 8 and not (out / "realign" / "_DONE.json").exists()
    stopped_s = time.time() - t0

    statuses, _, second_s = _submit_ok(ray_head, "trace-ray-jobs-test-2", cfg, out)
    assert statuses == ["skipped", "ran", "ran"]
    assert (out / "triage" / "_DONE.json").stat().st_mtime_ns == triage_marker
    realign = json.loads((out / "realign" / "summary.json").read_text())
    assert realign["resumed_from"] and realign["resumed_from"][0] >= at  # resumed, not trained again
    assert [json.loads(l)["step"] for l in (out / "realign" / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))

    n_in = sum(1 for line in pku_path.read_text().splitlines() if line.strip())
    table = pq.read_table(out / "triage" / "triaged.parquet")
    heldout = pq.read_table(out / "triage" / "heldout.parquet")
    summary = json.loads((out / "triage" / "summary.json").read_text())
    assert table.num_rows + heldout.num_rows == n_in == summary["total"] and heldout.num_rows > 0
    ids = table.column("id").to_pylist() + heldout.column("id").to_pylist()
    assert len(set(ids)) == n_in  # every row once, on one side
    assert sum(summary["counts"].values()) == n_in
    assert (out / "realign" / "adapter" / "adapter_config.json").exists()
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert metrics["split"] == "heldout" and metrics["rows"] == heldout.num_rows
    assert metrics["counts"] == summary["splits"]["heldout"]["counts"]
    before = _markers(out)

    statuses, stdout, third_s = _submit_ok(ray_head, "trace-ray-jobs-test-3", cfg, out)
    assert statuses == ["skipped"] * 3
    assert _markers(out) == before
    assert "already done" in stdout
    print(f"stopped submission {stopped_s:.0f} s, resubmission {second_s:.0f} s, third (all skipped) {third_s:.0f} s")


def _evaluate_job(*args):
    env = {k: v for k, v in ray_env().items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "jobs/evaluate.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_evaluate_job_runs_only_the_evaluate_stage(tmp_path, tiny_model_dir, pku_path):
    """jobs/evaluate.py on a finished triage + realign (made here without Ray: triage_records and a
    random LoRA adapter, with the markers the pipeline would write): refuses a missing upstream,
    plans in --dry-run, evaluates, then skips; its metrics equal evaluate_pairs called directly."""
    import pyarrow as pa
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trace_ray.data.readers import iter_records
    from trace_ray.evaluate_pairs import evaluate_pairs
    from trace_ray.pipeline import _write_marker_at, load_pipeline_config, plan, stage_uri
    from trace_ray.policy import load_policy
    from trace_ray.triage import triage_records

    out = tmp_path / "run"
    policy = ROOT / "configs" / "policies" / "pku_harm_v2.yaml"
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(f"name: eval-job\ndata: {pku_path}\nformat: pku\npolicy: {policy}\nout: {out}\n"
                   "realign: {model: {name: m}}\n"
                   "evaluate: {limit: 12, batch_size: 12, max_length: 64, max_prompts: 2, num_samples: 1, "
                   "max_new_tokens: 4}\n")
    r = _evaluate_job("--config", str(cfg))
    assert r.returncode == 2 and "--stages triage,realign" in r.stderr, r.stderr

    fps = plan(load_pipeline_config(str(cfg), []))
    rows = triage_records(load_policy(policy), list(iter_records(pku_path, "pku")))
    (out / "triage").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "triage" / "heldout.parquet")  # what evaluate reads
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out / "realign" / "adapter")
    for stage in ("triage", "realign"):
        _write_marker_at(stage_uri(str(out), stage), stage, fps[stage], 0.0, {})

    r = _evaluate_job("--config", str(cfg), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout[r.stdout.index("{"):])["stages"] == {"evaluate": {"status": "planned",
                                                                                 "fingerprint": fps["evaluate"]}}
    r = _evaluate_job("--config", str(cfg), "--result", str(tmp_path / "result.json"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / "result.json").read_text())["stages"]["evaluate"]["status"] == "ran"
    got = json.loads((out / "evaluate" / "metrics.json").read_text())
    want = evaluate_pairs(str(out / "realign" / "adapter"), str(out / "triage" / "heldout.parquet"),
                          str(tmp_path / "direct"), str(policy), limit=12, batch_size=12, max_length=64,
                          max_prompts=2, num_samples=1, max_new_tokens=4, show_progress=False)
    assert got["rows"] == want["rows"] == 12 and got["counts"] == want["counts"]
    assert json.dumps(got, sort_keys=True) == json.dumps(json.loads(json.dumps(want)), sort_keys=True)
    r = _evaluate_job("--config", str(cfg))
    assert r.returncode == 0 and "already done" in r.stdout, r.stderr
    # another realign config: its OUT/realign no longer counts as done for it
    r = _evaluate_job("--config", str(cfg), "realign.optim.lr=0.5")
    assert r.returncode == 2 and "--stages realign" in r.stderr, r.stderr


def test_evaluate_job_help_explains_every_option():
    r = _evaluate_job("--help")
    assert r.returncode == 0
    for opt in ("--config", "--dry-run", "--force", "--result", "--address", "key=value", "exit codes"):
        assert opt in r.stdout
