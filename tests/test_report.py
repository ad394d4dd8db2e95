"""Report: files exist, every method's metrics are in report.json, mean/std over seeds are right."""

from __future__ import annotations

import json
import statistics

from trace_ray.report import write_report


def _results():
    methods = {}
    for i, name in enumerate(["naive_dpo", "npo_all", "trace_uniform", "trace"]):
        runs = []
        for seed in range(3):
            runs.append({
                "seed": seed, "lr": 1e-3,
                "metrics": {"tpa_sampled": 0.5 + 0.1 * i + 0.01 * seed, "collateral": 0.1 - 0.02 * i, "tpa_greedy": 0.3,
                            "per_topic": {"tax": {"shifted": True, "tpa_sampled": 0.5}}},
                "curves": [{"step": s, "loss": 1.0 / (s + 1), "L_I": 0.5 / (s + 1)} for s in range(5)],
                "weights": [0.5, 1.0, 1.5] if name == "trace" else [],
            })
        methods[name] = {"runs": runs, "lr": 1e-3, "sample": {"prompt": "p", "greedy": "g", "sampled": ["a", "b"]}}
    return {"title": "t", "runtime_s": 12.0, "triage": {"total": 10, "counts": {"invert": 3, "punish": 1, "retain": 6, "unresolved": 0}},
            "reference": {"tpa_sampled": 0.2, "collateral": 0.0}, "methods": methods}


def test_write_report_files_and_numbers(tmp_path):
    paths = write_report(_results(), tmp_path)
    for key in ("json", "html", "triage", "weights", "losses", "tradeoff"):
        assert paths[key].exists(), key
        if paths[key].suffix == ".png":
            assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads(paths["json"].read_text())
    html = paths["html"].read_text()
    src = _results()
    for name, m in src["methods"].items():
        xs = [r["metrics"]["tpa_sampled"] for r in m["runs"]]
        assert rep["methods"][name]["mean"]["tpa_sampled"] == statistics.fmean(xs)
        assert abs(rep["methods"][name]["std"]["tpa_sampled"] - statistics.pstdev(xs)) < 1e-12
        assert name in html and name in rep["table_markdown"]
    assert "tpa_vs_collateral.png" in html


def test_report_cli_from_metrics(tmp_path):
    from trace_ray.cli import main

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"tpa_sampled": 0.9, "collateral": 0.01}))
    b.write_text(json.dumps({"tpa_sampled": 0.7, "collateral": 0.03}))
    out = tmp_path / "rep"
    assert main(["report", "--metrics", f"trace={a}", "--metrics", f"trace={b}", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert abs(rep["methods"]["trace"]["mean"]["tpa_sampled"] - 0.8) < 1e-12
    assert rep["methods"]["trace"]["n_seeds"] == 2
    assert (out / "tpa_vs_collateral.png").exists()
    assert main(["report", "--out", str(out)]) == 2
