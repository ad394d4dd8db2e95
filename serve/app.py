"""Build the Serve application: Gateway (FastAPI ingress) → generator + triage deployments.

Three ways in, one validation (``ServeSettings``):

    trace-ray serve --model runs/v2/adapter --policy configs/policies/pku_harm.yaml
    serve run serve.app:build_app model=runs/v2/adapter policy=configs/policies/pku_harm.yaml
    serve deploy serve/serve_config.yaml        # args: as in ServeSettings

The key is read from ``$TRACE_API_KEY`` (``api_key_env``) here, where the app is built, and only
its SHA-256 travels to the replicas.
"""

from __future__ import annotations

import importlib.util
import os

from trace_ray.config import ConfigError, from_dict

from serve.settings import ServeSettings


def _pick_backend(s: ServeSettings) -> str:
    if s.backend != "auto":
        return s.backend
    if importlib.util.find_spec("vllm") is None:
        return "hf"
    try:
        import torch

        return "vllm" if torch.cuda.is_available() else "hf"
    except Exception:
        return "hf"


def build_from_settings(s: ServeSettings, api_key: str | None = None):
    """``ServeSettings`` → a bound Serve ``Application`` (nothing is started here)."""
    from serve.hf_backend import hf_deployment
    from serve.ingress import Gateway, key_digest
    from serve.models import REMOTE, build_model_table
    from serve.triage_backend import refuse_callables, triage_deployment
    from trace_ray.config import to_dict

    table = build_model_table(s.model, s.adapters, s.served_name)
    policy = None
    if s.policy:
        from trace_ray.policy import load_policy

        policy = load_policy(s.policy)
        refuse_callables(policy)
    backend = _pick_backend(s)
    if api_key is None:
        api_key = os.environ.get(s.api_key_env) or None

    remote = [n for n, folder in table.adapters.items() if folder.startswith(REMOTE)]
    if backend == "hf" and remote:
        raise ConfigError(f"adapters: {', '.join(remote)} are in object storage; the hf backend loads local "
                          "adapter folders (object-storage adapters are for backend: vllm)")
    if backend == "vllm":
        from serve.vllm_backend import check_settings, vllm_deployment

        check_settings(table, s.vllm)

        llm = vllm_deployment(table, s.vllm)
    else:
        device = "cuda" if s.hf.num_gpus > 0 else None
        llm = hf_deployment(s.hf).bind(table.base_spec, table.adapters, s.hf.max_batch_size,
                                       s.hf.batch_wait_timeout_s, s.hf.dtype, device)
    triage = None
    if policy is not None:
        judge = None
        rule = policy.judge_rule
        if rule is not None:
            judge_spec = s.judge_model or rule.model
            if backend == "hf" and judge_spec == table.base_spec:
                judge = llm  # the served base answers the judge: no second copy
            else:
                judge = hf_deployment(s.hf).options(name="Judge").bind(
                    judge_spec, {}, s.hf.max_batch_size, s.hf.batch_wait_timeout_s, s.hf.dtype, None)
        triage = triage_deployment(s.triage_num_cpus).bind(policy.spec, judge)
    models = {"base_spec": table.base_spec, "base_name": table.base_name, "adapters": table.adapters}
    gateway = Gateway.options(ray_actor_options={"num_cpus": s.gateway_num_cpus})
    return gateway.bind(llm, triage, models, to_dict(s.limits), key_digest(api_key), s.guard,
                        policy.fingerprint if policy else None, backend)


def build_app(args: dict):
    """Application builder for ``serve run serve.app:build_app key=value ...`` and config files.

    ``args`` follow ``ServeSettings``; nested keys may be dotted (``limits.max_items=64``).
    """
    from trace_ray.config import deep_merge, parse_overrides

    data: dict = {}
    for k, v in dict(args).items():
        if k == "adapters" and isinstance(v, str):  # CLI form: name=dir,name2=dir2
            v = dict(p.split("=", 1) for p in v.split(",") if p)
        if isinstance(v, str) and k not in TEXT_KEYS:  # `serve run` passes strings: parse as YAML
            data = deep_merge(data, parse_overrides([f"{k}={v}"]))
        elif "." in k:
            data = deep_merge(data, parse_overrides([f"{k}=x"]))  # make the nesting, then set
            node = data
            for part in k.split(".")[:-1]:
                node = node[part]
            node[k.split(".")[-1]] = v
        else:
            data[k] = v
    return build_from_settings(from_dict(ServeSettings, data))


TEXT_KEYS = {"model", "policy", "served_name", "judge_model", "api_key_env"}
