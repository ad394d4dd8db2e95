"""``trace-ray report``: report.html + PNG plots from a results JSON or from evaluate outputs.

    trace-ray report --results runs/demo/report/report.json --out runs/demo/report2
    trace-ray report --metrics trace=m1.json --metrics naive_dpo=m2.json --out runs/cmp
"""

from __future__ import annotations

HELP = "write report.json, report.html and PNG plots"


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help=HELP, description=HELP + " from a demo's report.json or from metrics.json files.")
    p.add_argument("--results", default=None, help="a results JSON (e.g. a demo's report/report.json) to re-render")
    p.add_argument("--metrics", action="append", default=[], metavar="NAME=metrics.json",
                   help="a method's metrics from `trace-ray evaluate` (repeatable; same name twice = two seeds)")
    p.add_argument("--triage", default=None, help="a triage summary.json to plot the triage breakdown")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from trace_ray.report import write_report

    if not args.results and not args.metrics:
        raise FileNotFoundError("give --results FILE or at least one --metrics NAME=FILE")
    results = json.loads(Path(args.results).read_text()) if args.results else {"title": "trace-ray report", "methods": {}}
    for item in args.metrics:
        if "=" not in item:
            raise FileNotFoundError(f"--metrics {item!r}: expected NAME=metrics.json")
        name, path = item.split("=", 1)
        m = json.loads(Path(path).read_text())
        results["methods"].setdefault(name, {"runs": []})["runs"].append({"metrics": m})
    if args.triage:
        s = json.loads(Path(args.triage).read_text())
        results["triage"] = {"total": s["total"], "counts": s["counts"]}
    paths = write_report(results, args.out)
    print(f"wrote {paths['html']} and {paths['json']}")
    return 0
