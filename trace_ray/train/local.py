"""``train_local``: the same step and loop code, in this process, as one worker (no Ray Train).

For many small runs (the demo's baselines on 2 cores) where Ray Train's ~20 s worker start per
run costs more than the training. The loop is ``loop.run_worker`` with a ``LocalEnv``: world 1,
checkpoints under ``OUT/checkpoints/`` (a rerun resumes from the newest), the same metrics.jsonl
and output folders as ``realign``. ``backend`` settings are ignored (no process group).
"""

from __future__ import annotations

import json
from pathlib import Path

from trace_ray.train.config import RunConfig, used_categories


def train_local(config, *, records: list[dict] | None = None, progress: bool | None = None,
                save: bool = True, fail_at_step: int | None = None) -> dict:
    """Train in-process. ``config``: ``RunConfig`` / dict / YAML path.

    ``records``: rows to train on, already prepared (else read from ``data.triaged`` with the
    same filters and passes as ``realign``). Returns ``{"model", "tokenizer", "metrics" (list of
    per-step dicts), "weights" ({row: (id, w)}), "outputs" (paths), "output_dir"}``; the model is the
    trained (peft) model in memory.
    """
    from trace_ray.train.data import prepare_records
    from trace_ray.train.env import LocalEnv
    from trace_ray.train.loop import run_worker
    from trace_ray.train.run import _write_config, as_run_config, resolve_paths, check_inputs, collect_outputs, gold_records, make_plan, warn_duplicates

    cfg: RunConfig = as_run_config(config)
    if records is None:
        warn_duplicates(check_inputs(cfg))
        cfg = resolve_paths(cfg)
        records = prepare_records(cfg)
    else:
        cats = set(used_categories(cfg))
        records = [r for r in records if r.get("category") in cats]
    out = Path(cfg.output.dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _write_config(cfg, out, has_checkpoints=any((out / "checkpoints").glob("step_*")))
    plan = make_plan(cfg, len(records), 1, out)
    plan["fail_at_step"] = fail_at_step
    gold = gold_records(cfg) if cfg.impact.weights == "impact" else []
    env = LocalEnv(out, keep=max(1, cfg.train.keep_checkpoints),
                   progress=cfg.logging.progress if progress is None else progress)
    res = run_worker(cfg, plan, {0: records}, gold, env)
    outputs = {}
    if save and env.final_dir is not None:
        outputs = collect_outputs(env.final_dir, out)
    res["outputs"] = outputs
    res["output_dir"] = str(out)
    (out / "summary.json").write_text(json.dumps(
        {"output_dir": str(out), **outputs, "steps": plan["total_steps"], "rows_trained": len(records),
         "workers": 1, "backend": "local", "resumed_from": res["resumed_from"], "final_metrics": res["metrics"][-1] if res["metrics"] else {}},
        indent=1, default=str))
    return res
