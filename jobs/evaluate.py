"""The evaluate stage alone as a job: the re-aligned model of OUT/realign scored on OUT/triage's held-out split.

  ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
      -- python jobs/evaluate.py --config configs/real/qwen2.5-7b_pku.yaml out=s3://BUCKET/runs/qwen2.5-7b-pku
  python jobs/evaluate.py --config configs/real/smollm2_pku_cpu.yaml evaluate.limit=16   # no cluster

Takes the pipeline config jobs/pipeline.py takes and runs only its `evaluate` stage
(trace_ray.evaluate_pairs on OUT/triage/heldout.parquet, with the config's `evaluate:` keyword
arguments; the config's triage.holdout must have set that split aside), after checking that
OUT/triage and OUT/realign were finished with this same config (their _DONE.json fingerprints).
Writes OUT/evaluate/metrics.json and OUT/evaluate/_DONE.json; skipped when already done. The
evaluation runs in this (driver) process: on a cluster, submit to a head with a GPU or pass
evaluate.batch_size to fit the head's memory.
"""

from __future__ import annotations

import _common


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    for action in p._actions:  # the stage runs in this process: no Ray workers to join
        if action.dest == "address":
            action.help = "accepted for symmetry with the other jobs; the evaluate stage runs in this process, not on Ray"
    p.add_argument("--config", required=True,
                   help="pipeline YAML, the one jobs/pipeline.py ran (path or s3:// / gs:// URI)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the pipeline config, e.g. out=s3://b/run evaluate.limit=200 "
                        "(realign.* changes make OUT/realign count as not done for this config)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and the upstream outputs, print whether evaluate would run or be "
                        "skipped, run nothing")
    args = p.parse_args()

    def work():
        from trace_ray.pipeline import is_done, load_pipeline_config, plan, run_pipeline, stage_uri

        cfg = load_pipeline_config(args.config, list(args.overrides) + ["stages=[evaluate]"])
        fps = plan(cfg)
        missing = [s for s in ("triage", "realign") if not is_done(cfg.out, s, fps[s])]
        if missing:
            raise FileNotFoundError(
                f"{', '.join(stage_uri(cfg.out, s) for s in missing)}: no finished output for this config "
                f"(no _DONE.json with fingerprint {', '.join(fps[s] for s in missing)}); run "
                f"`python jobs/pipeline.py --config {args.config} --stages {','.join(missing)}` first "
                "(with the same key=value overrides)"
            )
        return run_pipeline(cfg, force=["evaluate"] if args.force else None, dry_run=args.dry_run)

    _common.main("jobs/evaluate.py", work, args.result)


if __name__ == "__main__":
    main()
