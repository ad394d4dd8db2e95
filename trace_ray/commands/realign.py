"""``trace-ray realign --config RUN.yaml [key=value ...]``: Stage 3 training on Ray Train."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "realign",
        help="re-align a model on a triaged dataset (TRACE losses + impact weights) with Ray Train",
        description=(
            "Train on OUT=output.dir: reads data.triaged (from `trace-ray triage`), runs the optional "
            "y_c and reference passes on Ray Data, the impact pass and training on Ray Train (DDP or "
            "DeepSpeed), and writes OUT/adapter or OUT/model, OUT/metrics.jsonl, OUT/weights.parquet. "
            "Running the same config again resumes from the latest checkpoint; a lost worker or node restarts "
            "the run from it by itself (backend.max_failures, backend.min_workers). See docs/training.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", required=True, help="run config YAML (see configs/realign_*.yaml)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="dotted overrides of the YAML, e.g. train.max_steps=10 backend.num_workers=2 loss.beta=0.1",
    )
    p.add_argument("--local", action="store_true",
                   help="run in this process as one worker (no Ray Train; same step and loop code)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--check", action="store_true", help="validate the config and inputs, then exit")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from trace_ray.train.config import load_run_config
    from trace_ray.train.run import check_inputs

    cfg = load_run_config(args.config, args.overrides)
    info = check_inputs(cfg)
    if args.check:
        print(json.dumps({"ok": True, **info}, indent=1))
        return 0
    if args.local:
        from trace_ray.train import train_local

        res = train_local(cfg)
        summary = {"output_dir": res["output_dir"], **res["outputs"]}
    else:
        from trace_ray.ray_utils import ensure_ray
        from trace_ray.train import realign

        ensure_ray(args.address)
        summary = realign(cfg)
    print(json.dumps(summary, indent=1, default=str))
    return 0
