"""Stages 2-3 as a job: reference pass, impact weights and training on Ray Train (issue 4's
``trace_ray.train.realign``), skipped when ``output.dir`` already holds a finished run.

  ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
      -- python jobs/realign.py --config configs/real/qwen2.5-7b_pku.yaml data.triaged=s3://b/x/triaged.parquet
"""

from __future__ import annotations

import _common


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="RunConfig YAML (trace_ray.train.config; path or URI)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10")
    args = p.parse_args()

    def work():
        from trace_ray.pipeline import realign_job

        _common.connect(args.address)
        return realign_job(args.config, args.overrides, force=args.force)

    _common.main("jobs/realign.py", work, args.result)


if __name__ == "__main__":
    main()
