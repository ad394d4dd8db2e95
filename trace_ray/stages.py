"""What each pipeline stage does: thin calls into the library parts.

``trace_ray.pipeline`` (the orchestrator: fingerprints, markers, skipping) imports this module;
this module never imports it, so the dependency runs one way. Every function takes a
:class:`StageContext`, reads its upstream outputs
(downloaded first when they live in an object store), writes into ``ctx.local_dir`` and returns a
small JSON-able result for the stage's ``_DONE.json``.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_ray import storage
from trace_ray.config import ConfigError, deep_merge, from_dict, read_yaml
from trace_ray.registry import Registry

STAGE_FUNCS: Registry = Registry("pipeline stage")


class ComponentMissing(RuntimeError):
    """A library part or optional dependency the config asks for is absent (exit code 3)."""


@dataclass
class StageContext:
    cfg: Any  # trace_ray.pipeline.PipelineConfig
    stage: str
    uri: str  # OUT/<stage> (local or remote)
    local_dir: str  # where the stage writes (== uri when local)
    fingerprints: dict[str, str]


def stage_uri(out: str, stage: str) -> str:
    return storage.join(out, stage)


def realign_dict(cfg) -> dict:
    """The ``RunConfig`` mapping of the realign stage, before the pipeline fills in its paths."""
    base = read_yaml(storage.localize(cfg.realign_config)) if cfg.realign_config else {}
    return deep_merge(base, cfg.realign)


def need(module: str, attr: str | None = None, what: str = ""):
    """Import ``module`` (and ``attr``) or raise ComponentMissing naming what is absent."""
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
    return storage.localize(storage.join(stage_uri(ctx.cfg.out, stage), *parts))


def model_output(realign_dir: str) -> str:
    """The servable result of realign: ``adapter/`` (LoRA) or ``model/`` (full fine-tune)."""
    for name in ("adapter", "model"):
        if (Path(realign_dir) / name).is_dir():
            return str(Path(realign_dir) / name)
    raise FileNotFoundError(f"{realign_dir} holds neither adapter/ nor model/ (did realign finish?)")


def run_config(ctx_cfg, triaged: str, out_dir: str):
    """The realign stage's ``RunConfig`` with the pipeline's paths filled in (validated)."""
    RunConfig = need("trace_ray.train.config", "RunConfig", "the realign stage")
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
        _check_kwargs("triage", cfg.triage, need("trace_ray.triage", "run_triage", "the triage stage"),
                      {"data", "policy", "out_dir", "format"})
    if "triage" in cfg.stages or "evaluate" in cfg.stages:
        load_policy = need("trace_ray.policy", "load_policy", "the policy")
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
        ServeSettings = need("serve.settings", "ServeSettings", "the serve_check stage")
        try:
            from_dict(ServeSettings, deep_merge({"model": "<realign output>"}, cfg.serve_check.settings))
        except ConfigError as e:
            raise ConfigError(f"serve_check.settings.{e}") from None


@STAGE_FUNCS.register("triage")
def triage(ctx) -> dict:
    run_triage = need("trace_ray.triage", "run_triage", "the triage stage")
    load_policy = need("trace_ray.policy", "load_policy", "the triage stage")
    cfg = ctx.cfg
    policy = load_policy(storage.localize(cfg.policy))
    summary = run_triage(storage.localize(cfg.data), policy, ctx.local_dir, format=cfg.format, **cfg.triage)
    return {"total": summary.get("total"), "counts": summary.get("counts")}


@STAGE_FUNCS.register("realign")
def realign(ctx) -> dict:
    realign_fn = need("trace_ray.train", "realign", "the realign stage")
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
    check = need("trace_ray.serve_check", "chat_once", "the serve_check stage")
    sc = ctx.cfg.serve_check
    answer = check(
        model=model_output(upstream(ctx, "realign")),
        policy=storage.localize(ctx.cfg.policy),
        prompt=sc.prompt, max_tokens=sc.max_tokens, timeout_s=sc.timeout_s, port=sc.port,
        settings=sc.settings,
    )
    storage.write_json(str(Path(ctx.local_dir) / "response.json"), answer)
    return answer
