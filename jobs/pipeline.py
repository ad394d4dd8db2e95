"""The whole chain as one job: triage → realign → evaluate → serve_check, resumable per stage.

  ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
      -- python jobs/pipeline.py --config configs/real/smollm2_pku_cpu.yaml
  python jobs/pipeline.py --config configs/real/smollm2_pku_cpu.yaml out=runs/smollm2   # local Ray

A resubmission skips every stage whose OUT/<stage>/_DONE.json matches its inputs.
"""

from __future__ import annotations

import _common


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="pipeline YAML (path or s3:// / gs:// URI)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the pipeline config, e.g. out=s3://b/run realign.train.max_steps=2")
    p.add_argument("--stages", default=None,
                   help="comma-separated subset of triage,realign,evaluate,serve_check (default: the config's)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and inputs, print which stages would run or be skipped, run nothing")
    args = p.parse_args()

    def work():
        from trace_ray.pipeline import load_pipeline_config, run_pipeline

        overrides = list(args.overrides)
        if args.stages:
            overrides.append(f"stages=[{args.stages}]")
        cfg = load_pipeline_config(args.config, overrides)
        if not args.dry_run:
            _common.connect(args.address)
        return run_pipeline(cfg, force=["all"] if args.force else None, dry_run=args.dry_run)

    _common.main("jobs/pipeline.py", work, args.result)


if __name__ == "__main__":
    main()
