"""Stage 1 as a job: judge both responses of every pair with the new policy (Ray Data).

  ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/triage.py \
      --data s3://bucket/pku.jsonl --format pku --policy configs/policies/pku_shift.yaml --out s3://bucket/runs/x/triage

Writes OUT/triaged.parquet, OUT/summary.json and OUT/_DONE.json; skipped when already done.
"""

from __future__ import annotations

import _common


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="preference data: jsonl/json/parquet file or folder (path or URI)")
    p.add_argument("--format", default="auto", choices=["auto", "pairs", "pku", "hh"], help="reader (default: auto-detect)")
    p.add_argument("--policy", required=True, help="the new policy YAML (path or URI)")
    p.add_argument("--out", required=True, help="output folder (path or s3:// / gs:// URI)")
    args = p.parse_args()

    def work():
        from trace_ray.pipeline import triage_job

        _common.connect(args.address)
        return triage_job(args.data, args.policy, args.out, format=args.format, force=args.force)

    _common.main("jobs/triage.py", work, args.result)


if __name__ == "__main__":
    main()
