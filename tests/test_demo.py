"""The ``--quick`` demo end to end on the session's real Ray: world → reference (cached) → Ray Data
triage → the four methods through the shared trainer → evaluation → report files."""

from __future__ import annotations

import json
import time

from trace_ray.data import synthshift as ss


def test_quick_demo_end_to_end(tmp_path, ray_session):
    from trace_ray.demo import METHODS, quick_config, run_demo

    t0 = time.time()
    results = run_demo(quick_config(str(tmp_path / "demo")))
    elapsed = time.time() - t0
    rep_dir = tmp_path / "demo" / "report"
    for name in ("report.json", "report.html", "triage.png", "losses.png", "tpa_vs_collateral.png", "weights.png"):
        assert (rep_dir / name).exists(), name
    rep = json.loads((rep_dir / "report.json").read_text())
    # triage agrees with the world's exact labels, computed independently of the pipeline
    expected = ss.build_world().stats()["train"]["expected"]
    assert rep["triage"]["counts"] == {"unresolved": 0, **expected}
    assert set(rep["methods"]) == set(METHODS)
    html = (rep_dir / "report.html").read_text()
    for name, m in rep["methods"].items():
        assert name in html
        for k in ("tpa_sampled", "tpa_greedy", "collateral", "utility_nll", "kl_to_ref", "pref_accuracy"):
            assert k in m["mean"], (name, k)
            assert m["mean"][k] == m["runs"][0]["metrics"][k]  # one seed: the mean is that run
        assert m["runs"][0]["curves"], name  # the trainer's per-step metrics came back
        assert m["sample"]["prompt"] and isinstance(m["sample"]["greedy"], str)
    assert rep["methods"]["trace"]["runs"][0]["weights"]  # impact weights were computed
    # trained models moved away from the reference
    assert all(m["mean"]["kl_to_ref"] > 0 for m in rep["methods"].values())
    print(f"quick demo: {elapsed:.0f} s")


def test_demo_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "trace_ray", "demo", "--help"], capture_output=True, text=True, check=True)
    for opt in ("--out", "--quick", "--methods", "--lrs", "--seeds", "--steps", "--parallel", "--set"):
        assert opt in out.stdout
