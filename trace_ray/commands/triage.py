"""``trace-ray triage``: Stage 1 on Ray Data (see ``trace_ray.triage.run_triage``)."""

from __future__ import annotations

import argparse
import json

EXAMPLES = """examples:
  trace-ray triage --data ../shared/data/external/hh-rlhf_harmless-base_test.jsonl.gz \\
    --policy configs/policies/hh_harmless_v2.yaml --out runs/triage_hh --holdout 0.1
  trace-ray triage --data prefs.jsonl --prompt-key question --chosen-key good --rejected-key bad \\
    --policy new.yaml --out runs/t                      # other column names
  trace-ray triage --data trl-lib/ultrafeedback_binarized --split train --policy new.yaml --out runs/uf
  trace-ray triage --data runs/saved_dataset --policy new.yaml --out runs/t   # a datasets save_to_disk folder
  trace-ray triage --data prefs.jsonl --policy new.yaml --compare old.yaml --out runs/whatif"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "triage",
        help="judge both responses of every pair with a new policy: invert / punish / retain / unresolved",
        description=(
            "Judge both responses of every preference pair with the new policy and file each pair as "
            "invert (chosen non-compliant, rejected compliant), punish (both non-compliant), retain "
            "(chosen compliant) or unresolved (malformed row or oracle error, kept with its reason). "
            "Writes OUT/triaged.parquet (the training table), OUT/heldout.parquet and "
            "OUT/validation.parquet (with --holdout / --validation), OUT/compare.json (with --compare) "
            "and OUT/summary.json. Each table is a folder of Parquet part files written by the Ray Data "
            "workers, plus _SUCCESS once complete; OUT may be an s3:// or gs:// URI. Rules run "
            "vectorised (RE2 on Arrow columns where a pattern translates exactly; the summary's "
            "'engines' says which engine each rule ran on). Before any work, the first 1,000 rows are "
            "filed in plain Python: when >= 90% of them would be unresolved for one reason, it stops and "
            "names the reason and the flag that probably fixes it.\n\n" + EXAMPLES
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True,
                   help="preference data: a .jsonl/.json/.parquet/.arrow file (.gz ok), a folder of them, a "
                        "datasets save_to_disk folder, or a Hugging Face hub id (org/name, with --split)")
    p.add_argument("--format", default="auto", choices=["auto", "pairs", "implicit", "pku", "hh"],
                   help="input layout: pairs (prompt/chosen/rejected: TRL standard strings or TRL conversational "
                        "message lists), implicit (TRL implicit prompt: chosen/rejected whole conversations, the "
                        "shared opening turns are the prompt), pku (PKU-SafeRLHF columns), hh (HH-RLHF "
                        "transcripts); auto detects from the first row's columns (default: auto)")
    p.add_argument("--split", default=None,
                   help="the split of a hub id or of a datasets folder holding several (e.g. train, test)")
    for col, example in (("prompt", "question"), ("chosen", "good"), ("rejected", "bad")):
        p.add_argument(f"--{col}-key", default=None, metavar="COLUMN",
                       help=f"the file's column that holds the {col} (default: {col}; e.g. --{col}-key {example})")
    p.add_argument("--policy", required=True, help="the new policy, a YAML file (see configs/policies/)")
    p.add_argument("--out", required=True,
                   help="output folder or s3:// / gs:// URI for the Parquet tables and summary.json (replaced if present)")
    p.add_argument("--holdout", type=float, default=0.0, metavar="F",
                   help="fraction of prompts set aside as OUT/heldout.parquet, never trained on, for `trace-ray "
                        "evaluate` (by a stable hash of the prompt: pairs sharing a prompt stay together; the "
                        "same rows in every run) (default: 0)")
    p.add_argument("--validation", type=float, default=0.0, metavar="F",
                   help="fraction of prompts set aside as OUT/validation.parquet, for choosing hyper-parameters "
                        "(disjoint from the held-out and training rows) (default: 0)")
    p.add_argument("--compare", default=None, metavar="OLD.yaml",
                   help="also file every pair with this old policy (rules only) and print/write how the pairs "
                        "move between categories (a 4x4 table), examples of each move and an estimate of the "
                        "re-alignment work (OUT/compare.json)")
    p.add_argument("--pku-chosen", default="better", choices=["better", "safer", "authors"],
                   help="PKU only: which response is y_w — better_response_id, safer_response_id, or the "
                        "TRACE authors' rule (the safe one if exactly one is safe, else the safer) "
                        "(default: better)")
    p.add_argument("--allow-unresolved", action="store_true",
                   help="skip the pre-flight check and triage even data that is mostly unresolved")
    p.add_argument("--batch-size", type=int, default=4096,
                   help="rows read and triaged at once: one Ray Data block, one batch of the vectorised "
                        "rules (default: 4096)")
    p.add_argument("--compression", default="snappy", choices=["snappy", "zstd", "lz4", "gzip", "brotli", "none"],
                   help="Parquet codec of the output part files: snappy (Ray's and pyarrow's default), zstd "
                        "(about as fast here, files ~38%% smaller), none (fastest: compression is ~7 of the ~35 "
                        "CPU-microseconds a 200-2,000-character row costs; files ~1.7x larger), lz4, gzip "
                        "(slow), brotli (default: snappy)")
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
        old = load_policy(args.compare) if args.compare else None
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
        summary = run_triage(args.data, policy, args.out, args.format, pku_chosen=args.pku_chosen, split=args.split,
                             prompt_key=args.prompt_key, chosen_key=args.chosen_key, rejected_key=args.rejected_key,
                             holdout=args.holdout, validation=args.validation, compare=old,
                             allow_unresolved=args.allow_unresolved, batch_size=args.batch_size,
                             num_actors=args.num_actors, show_progress=not args.no_progress, address=args.address,
                             max_retries=args.max_retries, compression=args.compression)
    except (ValueError, ImportError) as e:  # format detection, bad arguments, mostly unresolved, vllm missing
        print(f"trace-ray triage: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    print(format_summary(summary))
    if "compare" in summary:
        from trace_ray.compare import format_compare

        print(format_compare(summary["compare"]))
    return 0
