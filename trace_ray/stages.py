"""What each pipeline stage does: thin calls into the library parts (see ``trace_ray.pipeline``).

Every function takes a :class:`trace_ray.pipeline.StageContext`, reads its upstream outputs
(downloaded first when they live in an object store), writes into ``ctx.local_dir`` and returns a
small JSON-able result for the stage's ``_DONE.json``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from trace_ray import storage
from trace_ray.config import ConfigError, from_dict
from trace_ray.registry import Registry

STAGE_FUNCS: Registry = Registry("pipeline stage")


def _need(module: str, attr: str | None = None, what: str = ""):
    """Import ``module`` (and ``attr``) or raise ComponentMissing naming what is absent."""
    from trace_ray.pipeline import ComponentMissing

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ComponentMissing(f"{what or module} needs {e.name!r}, which is not installed/built") from e
    if attr is None:
        return mod
    if not hasattr(mod, attr):
        raise ComponentMissing(f"{what or module}: {module}.{attr} does not exist in this version")
    return getattr(mod, attr)


def upstream(ctx, stage: str, *parts: str) -> str:
    """Local path of ``OUT/<stage>/<parts>`` (downloaded when remote)."""
    from trace_ray.pipeline import stage_uri

    return storage.localize(storage.join(stage_uri(ctx.cfg.out, stage), *parts))


def model_output(realign_dir: str) -> str:
    """The servable result of realign: ``adapter/`` (LoRA) or ``model/`` (full fine-tune)."""
    for name in ("adapter", "model"):
        if (Path(realign_dir) / name).is_dir():
            return str(Path(realign_dir) / name)
    raise FileNotFoundError(f"{realign_dir} holds neither adapter/ nor model/ (did realign finish?)")


def run_config(ctx_cfg, triaged: str, out_dir: str):
    """The realign stage's ``RunConfig`` with the pipeline's paths filled in (validated)."""
    from trace_ray.config import deep_merge
    from trace_ray.pipeline import realign_dict

    RunConfig = _need("trace_ray.train.config", "RunConfig", "the realign stage")
    d = deep_merge(realign_dict(ctx_cfg), {"data": {"triaged": triaged}, "output": {"dir": out_dir}})
    model = d.get("model", {}).get("name", "")
    if storage.is_remote(model):
        d["model"]["name"] = storage.localize(model)
    try:
        return from_dict(RunConfig, d)
    except ConfigError as e:
        raise ConfigError(f"realign.{e}") from None


def _check_kwargs(section: str, given: dict, fn, fixed: set[str]) -> None:
    import inspect

    allowed = set(inspect.signature(fn).parameters) - fixed
    for k in given:
        if k not in allowed:
            raise ConfigError(f"{section}.{k}: unknown key; valid keys here: {', '.join(sorted(allowed))}")


def validate(cfg) -> None:
    """Checks every stage's config before any stage starts (exit code 2 on a problem)."""
    if "triage" in cfg.stages:
        _check_kwargs("triage", cfg.triage, _need("trace_ray.triage", "run_triage", "the triage stage"),
                      {"data", "policy", "out_dir", "format"})
    if "triage" in cfg.stages or "evaluate" in cfg.stages:
        load_policy = _need("trace_ray.policy", "load_policy", "the policy")
        load_policy(storage.localize(cfg.policy))
    if "realign" in cfg.stages:
        run_config(cfg, triaged="<from the triage stage>", out_dir="<stage folder>")
    if "evaluate" in cfg.stages:
        from trace_ray.evaluate_pairs import evaluate_pairs

        _check_kwargs("evaluate", cfg.evaluate, evaluate_pairs, {"model", "data", "out_dir", "policy", "in_sample"})
        if "triage" in cfg.stages and not cfg.triage.get("holdout"):
            raise ConfigError("evaluate: the evaluate stage scores the held-out split, and triage sets none; "
                              "set triage.holdout (e.g. 0.1), or drop evaluate from stages")
    if "serve_check" in cfg.stages:
        from trace_ray.config import deep_merge

        ServeSettings = _need("serve.settings", "ServeSettings", "the serve_check stage")
        try:
            from_dict(ServeSettings, deep_merge({"model": "<realign output>"}, cfg.serve_check.settings))
        except ConfigError as e:
            raise ConfigError(f"serve_check.settings.{e}") from None


@STAGE_FUNCS.register("triage")
def triage(ctx) -> dict:
    run_triage = _need("trace_ray.triage", "run_triage", "the triage stage")
    load_policy = _need("trace_ray.policy", "load_policy", "the triage stage")
    cfg = ctx.cfg
    policy = load_policy(storage.localize(cfg.policy))
    summary = run_triage(storage.localize(cfg.data), policy, ctx.local_dir, format=cfg.format, **cfg.triage)
    return {"total": summary.get("total"), "counts": summary.get("counts")}


@STAGE_FUNCS.register("realign")
def realign(ctx) -> dict:
    realign_fn = _need("trace_ray.train", "realign", "the realign stage")
    config = run_config(ctx.cfg, upstream(ctx, "triage", "triaged.parquet"), ctx.local_dir)
    result = realign_fn(config) or {}
    return json.loads(json.dumps(result, default=str))


@STAGE_FUNCS.register("evaluate")
def evaluate(ctx) -> dict:
    """Metrics of the re-aligned model on the held-out split that triage set aside
    (``OUT/triage/heldout.parquet``, never trained on; ``trace_ray.evaluate_pairs``)."""
    from trace_ray.evaluate_pairs import evaluate_pairs

    try:
        heldout = upstream(ctx, "triage", "heldout.parquet")
    except FileNotFoundError:
        raise FileNotFoundError(f"{upstream(ctx, 'triage')} holds no heldout.parquet: the evaluate stage needs a "
                                "held-out split; set triage.holdout (e.g. 0.1) and rerun triage") from None
    metrics = evaluate_pairs(
        model=model_output(upstream(ctx, "realign")),
        data=heldout,
        policy=storage.localize(ctx.cfg.policy),
        out_dir=ctx.local_dir,
        **ctx.cfg.evaluate,
    )
    return {k: v for k, v in metrics.items() if k in ("split", "rows", "counts", "tpa_greedy", "tpa_sampled",
                                                       "refusal_rate", "over_refusal", "utility_nll", "kl_to_ref",
                                                       "pref_accuracy")}


@STAGE_FUNCS.register("serve_check")
def serve_check(ctx) -> dict:
    check = _need("trace_ray.serve_check", "chat_once", "the serve_check stage")
    sc = ctx.cfg.serve_check
    answer = check(
        model=model_output(upstream(ctx, "realign")),
        policy=storage.localize(ctx.cfg.policy),
        prompt=sc.prompt, max_tokens=sc.max_tokens, timeout_s=sc.timeout_s, port=sc.port,
        settings=sc.settings,
    )
    storage.write_json(str(Path(ctx.local_dir) / "response.json"), answer)
    return answer


# --------------------------------------------------------------------------------------------
# One stage on its own (jobs/triage.py, jobs/realign.py): the same marker and skip logic, with
# the stage's output folder given directly instead of OUT/<stage>.


def triage_job(data: str, policy: str, out: str, format: str = "auto", force: bool = False, **options) -> dict:
    """Triage ``data`` with ``policy`` into ``out`` (``triaged.parquet``, ``summary.json``, and the
    held-out / validation splits); ``options``: more ``run_triage`` keyword arguments."""
    from trace_ray.pipeline import PipelineConfig, content_id, fingerprint, run_stage, StageContext

    cfg = from_dict(PipelineConfig, {"out": out, "data": data, "policy": policy, "format": format, "stages": ["triage"],
                                     "triage": options})
    validate(cfg)
    fp = fingerprint("triage", content_id(data), format, content_id(policy), options)
    return run_stage("triage", out, fp, lambda local, uri: triage(
        StageContext(cfg=cfg, stage="triage", uri=uri, local_dir=local, fingerprints={"triage": fp})), force=force)


def realign_job(config_path: str | None, overrides: list[str] | None = None, force: bool = False) -> dict:
    """``trace-ray realign`` as a resumable job: skipped when ``output.dir`` holds a marker for
    the same config and the same triaged data; ``data.triaged`` / ``output.dir`` may be URIs."""
    from dataclasses import replace

    from trace_ray.config import load_config, to_dict
    from trace_ray.pipeline import content_id, fingerprint, run_stage

    RunConfig = _need("trace_ray.train.config", "RunConfig", "the realign job")
    realign_fn = _need("trace_ray.train", "realign", "the realign job")
    local_cfg = storage.localize(config_path) if config_path and storage.is_remote(config_path) else config_path
    config = load_config(RunConfig, local_cfg, overrides)
    out = config.output.dir
    triaged = storage.localize(config.data.triaged)
    d = to_dict(config)
    d["output"].pop("dir")
    d["data"].pop("triaged")
    fp = fingerprint("realign", content_id(config.data.triaged), d)

    def work(local: str, uri: str) -> dict:
        cfg2 = replace(config, data=replace(config.data, triaged=triaged), output=replace(config.output, dir=local))
        return json.loads(json.dumps(realign_fn(cfg2) or {}, default=str))

    return run_stage("realign", out, fp, work, force=force)
