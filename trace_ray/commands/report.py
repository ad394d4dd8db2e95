"""``trace-ray report``: report.html + PNG plots from a demo's results, a real run's outputs, or
evaluate outputs.

    trace-ray report --results runs/demo/report/report.json --out runs/demo/report2
    trace-ray report --pipeline runs/smollm2 --out runs/smollm2/report
    trace-ray report --run runs/realign_tiny --triage runs/triage_hh --metrics trace=runs/eval/metrics.json --out r
    trace-ray report --metrics trace=m1.json --metrics naive_dpo=m2.json --out runs/cmp
"""

from __future__ import annotations

import argparse

HELP = "write report.json, report.html and PNG plots"
EXAMPLES = """examples:
  trace-ray report --pipeline runs/smollm2 --out runs/smollm2/report       # OUT of jobs/pipeline.py
  trace-ray report --run runs/realign_tiny --triage runs/triage_hh --metrics trace=runs/eval/metrics.json --out runs/r
  trace-ray report --results runs/demo/report/report.json --out runs/demo/report2
  trace-ray report --metrics trace=m1.json --metrics naive_dpo=m2.json --out runs/cmp

A real run's report: the metrics of `trace-ray evaluate --data` (headline table, reference row and
every nested number), loss-part curves, reward margin and accuracy, gradient norm and learning
rate per step, impact weights by category with the share of zero weights, the ten highest- and
lowest-weighted conflict samples with their text, and triage's per-rule hits."""


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help=HELP, description=HELP + " from a demo's report.json, a real run's "
                              "outputs, or metrics.json files.\n\n" + EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=None, help="a results JSON (e.g. a demo's report/report.json) to re-render")
    p.add_argument("--pipeline", default=None, metavar="OUT",
                   help="a pipeline output folder (jobs/pipeline.py): reads OUT/triage, OUT/realign and "
                        "OUT/evaluate/metrics.json")
    p.add_argument("--run", default=None, metavar="REALIGN_DIR",
                   help="a realign output folder: metrics.jsonl (curves), weights.parquet (weights and the "
                        "highest/lowest-weighted samples), run_config.yaml (where the triaged table is)")
    p.add_argument("--triaged", default=None,
                   help="the training table for the weighted samples' text (default: run_config.yaml's data.triaged)")
    p.add_argument("--metrics", action="append", default=[], metavar="NAME=metrics.json",
                   help="a method's metrics from `trace-ray evaluate` (repeatable; same name twice = two seeds; "
                        "with --run, NAME=... gives that run's held-out metrics)")
    p.add_argument("--triage", default=None,
                   help="a triage output folder or its summary.json (counts, per-rule hits, splits)")
    p.add_argument("--title", default=None, help="the report's title")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from trace_ray.report import write_report

    metrics = []
    for item in args.metrics:
        if "=" not in item:
            raise FileNotFoundError(f"--metrics {item!r}: expected NAME=metrics.json")
        metrics.append(item.split("=", 1))
    if args.pipeline or args.run:
        from trace_ray.report_run import collect_run

        base = Path(args.pipeline) if args.pipeline else None
        if base is not None and not base.is_dir():
            raise FileNotFoundError(f"--pipeline {base} is not a folder")
        triage = args.triage or (str(base / "triage") if base and (base / "triage" / "summary.json").exists() else None)
        realign = args.run or (str(base / "realign") if base and (base / "realign").is_dir() else None)
        name, mpath = metrics.pop(0) if metrics else ("trace", None)
        if mpath is None and base and (base / "evaluate" / "metrics.json").exists():
            mpath = str(base / "evaluate" / "metrics.json")
        results = collect_run(triage=triage, realign=realign, metrics=mpath, triaged=args.triaged, name=name,
                              title=args.title or f"trace-ray run: {(base or Path(realign)).name}")
    elif args.results:
        results = json.loads(Path(args.results).read_text())
    elif metrics:
        results = {"title": args.title or "trace-ray report", "methods": {}}
    else:
        raise FileNotFoundError("give --pipeline OUT, --run DIR, --results FILE or at least one --metrics NAME=FILE")
    for name, path in metrics:
        m = json.loads(Path(path).read_text())
        results["methods"].setdefault(name, {"runs": []})["runs"].append({"metrics": m})
    if args.triage and "triage" not in results:
        p = Path(args.triage)
        s = json.loads((p / "summary.json" if p.is_dir() else p).read_text())
        results["triage"] = {"total": s["total"], "counts": s["counts"]}
    paths = write_report(results, args.out)
    print(f"wrote {paths['html']} and {paths['json']}")
    return 0
