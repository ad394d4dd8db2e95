"""``trace-ray triage``: Stage 1 on Ray Data (see ``trace_ray.triage.run_triage``)."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "triage",
        help="judge both responses of every pair with a new policy: invert / punish / retain / unresolved",
        description=(
            "Judge both responses of every preference pair with the new policy and file each pair as "
            "invert (chosen non-compliant, rejected compliant), punish (both non-compliant), retain "
            "(chosen compliant) or unresolved (malformed row or oracle error, kept with its reason). "
            "Writes OUT/triaged.parquet (a folder of Parquet part files written by the Ray Data workers, "
            "plus _SUCCESS once complete) and OUT/summary.json; OUT may be an s3:// or gs:// URI. "
            "Rules run vectorised (RE2 on Arrow columns where a pattern translates exactly; the "
            "summary's 'engines' says which engine each rule used).\n\n"
            "example:\n  trace-ray triage --data ../shared/data/external/hh-rlhf_harmless-base_test.jsonl.gz "
            "\\\n    --policy configs/policies/hh_harmless_v2.yaml --out runs/triage_hh"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True,
                   help="preference data: a .jsonl/.json/.parquet file (.gz ok), a folder of them, "
                        "or a datasets save_to_disk folder")
    p.add_argument("--format", default="auto", choices=["auto", "pairs", "pku", "hh"],
                   help="input layout: pairs (prompt/chosen/rejected), pku (PKU-SafeRLHF columns), "
                        "hh (HH-RLHF transcripts); auto detects from the columns (default: auto)")
    p.add_argument("--policy", required=True, help="the new policy, a YAML file (see configs/policies/)")
    p.add_argument("--out", required=True,
                   help="output folder or s3:// / gs:// URI for triaged.parquet/ and summary.json (replaced if present)")
    p.add_argument("--pku-chosen", default="better", choices=["better", "safer", "authors"],
                   help="PKU only: which response is y_w — better_response_id, safer_response_id, or the "
                        "TRACE authors' rule (the safe one if exactly one is safe, else the safer) "
                        "(default: better)")
    p.add_argument("--batch-size", type=int, default=4096,
                   help="rows read and triaged at once: one Ray Data block, one batch of the vectorised "
                        "rules (default: 4096)")
    p.add_argument("--num-actors", type=int, default=None,
                   help="size of the LLM judge actor pool / vLLM engine count (default: the judge "
                        "rule's concurrency); ignored for rule-only policies")
    p.add_argument("--max-retries", type=int, default=None,
                   help="how often a task whose worker died is retried and a judge actor restarted "
                        "(default: Ray Data's, without limit); every row still lands exactly once")
    p.add_argument("--address", default=None,
                   help="Ray cluster address to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the whole summary as JSON instead of the table")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from trace_ray.policy import PolicyError, load_policy

    try:
        policy = load_policy(args.policy)  # validated before Ray starts
    except PolicyError as e:
        print(f"trace-ray triage: policy error: {e}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("trace-ray triage: --batch-size must be positive", file=sys.stderr)
        return 2
    if args.max_retries is not None and args.max_retries < 0:
        print("trace-ray triage: --max-retries must be >= 0", file=sys.stderr)
        return 2
    from trace_ray.triage import format_summary, run_triage

    try:
        summary = run_triage(args.data, policy, args.out, args.format, pku_chosen=args.pku_chosen,
                             batch_size=args.batch_size, num_actors=args.num_actors,
                             show_progress=not args.no_progress, address=args.address,
                             max_retries=args.max_retries)
    except (ValueError, ImportError) as e:  # format detection, bad arguments, vllm missing
        print(f"trace-ray triage: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, ensure_ascii=False) if args.json else format_summary(summary))
    return 0
