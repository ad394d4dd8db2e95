"""The real-model benchmark: SmolLM2-135M-Instruct re-aligned on the real HH-RLHF pairs to a new
policy (a voice assistant's), TRACE against TRACE with uniform weights, naive oracle DPO and NPO
without triage, measured on held-out prompts. The library part is ``trace_ray.real_benchmark``;
the settings are ``configs/real/smollm2_hh_voice.yaml``; the page is docs/real_benchmark.md.

    python benchmarks/realign_real.py --out runs/realign_real                  # ~45 min on 2 idle cores
    python benchmarks/realign_real.py --out runs/realign_real_quick --quick    # every stage, a few minutes
    python benchmarks/realign_real.py --out runs/x lrs=[1e-3] realign.loss.nll_anchor=0   # overrides

The full run writes ``benchmarks/results/realign_real.json`` and ``benchmarks/results/realign_real/``
(report.html, report.json, PNGs); a ``--quick`` run or one with overrides writes only under ``--out``
unless ``--results`` says where.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from trace_ray.real_benchmark import CONFIG, load_bench_config, quick_overrides, run_benchmark

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Writes OUT/report/report.{json,html} and PNGs, OUT/triage/ (splits), OUT/runs/ (adapters).")
    p.add_argument("--config", default=str(CONFIG), help=f"benchmark config (default {CONFIG.relative_to(ROOT)})")
    p.add_argument("--out", default="runs/realign_real", help="output folder (default runs/realign_real)")
    p.add_argument("--quick", action="store_true",
                   help="every stage at the smallest size (the test suite): one method (TRACE), one lr, one seed, "
                        "2 steps, 2 prompts per set, 8 new tokens")
    p.add_argument("--results", default=None,
                   help="copy the results JSON here and the report next to it (default: benchmarks/results/"
                        "realign_real.json and benchmarks/results/realign_real/ for the full run without overrides, "
                        "else nothing outside --out)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the config, e.g. lrs=[1e-3] seeds=[0] realign.train.max_steps=8")
    args = p.parse_args(argv)
    overrides = (quick_overrides() if args.quick else []) + list(args.overrides)
    cfg = load_bench_config(args.config, overrides)
    results = args.results
    if results is None and not args.quick and not args.overrides and Path(args.config).resolve() == CONFIG:
        results = str(ROOT / "benchmarks" / "results" / "realign_real.json")
    report_dir = str(Path(results).with_suffix("")) if results else None
    run_benchmark(cfg, args.out, quick=args.quick, results_path=results, report_dir=report_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
