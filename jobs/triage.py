"""Stage 1 as a job: judge both responses of every pair with the new policy (Ray Data).

  ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/triage.py \
      --data s3://bucket/pku.jsonl --format pku --policy configs/policies/pku_shift.yaml --out s3://bucket/runs/x/triage

Writes OUT/triaged.parquet (+ heldout.parquet / validation.parquet with --holdout / --validation),
OUT/summary.json and OUT/_DONE.json; skipped when already done.
"""

from __future__ import annotations

import _common


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="preference data: jsonl/json/parquet file or folder (path or URI)")
    p.add_argument("--format", default="auto", choices=["auto", "pairs", "implicit", "pku", "hh"],
                   help="reader (default: auto-detect; see `trace-ray triage --help`)")
    p.add_argument("--policy", required=True, help="the new policy YAML (path or URI)")
    p.add_argument("--out", required=True, help="output folder (path or s3:// / gs:// URI)")
    p.add_argument("--holdout", type=float, default=0.0, help="fraction of prompts held out (OUT/heldout.parquet)")
    p.add_argument("--validation", type=float, default=0.0, help="fraction of prompts for validation")
    p.add_argument("--split", default=None, help="split of a hub id or datasets folder")
    for col in ("prompt", "chosen", "rejected"):
        p.add_argument(f"--{col}-key", default=None, metavar="COLUMN", help=f"the file's {col} column")
    args = p.parse_args()
    options = {k: v for k, v in (("holdout", args.holdout), ("validation", args.validation), ("split", args.split),
                                 ("prompt_key", args.prompt_key), ("chosen_key", args.chosen_key),
                                 ("rejected_key", args.rejected_key)) if v}

    def work():
        from trace_ray.pipeline import triage_job

        _common.connect(args.address)
        return triage_job(args.data, args.policy, args.out, format=args.format, force=args.force, **options)

    _common.main("jobs/triage.py", work, args.result)


if __name__ == "__main__":
    main()
