"""Build the Serve application: Gateway (FastAPI ingress) → generator + triage deployments.

Three ways in, one validation (``ServeSettings``):

    trace-ray serve --model runs/v2/adapter --policy v2=configs/policies/pku_harm_v2.yaml
    serve run serve.app:build_app model=runs/v2/adapter policy=configs/policies/pku_harm_v2.yaml
    serve deploy serve/serve_config.yaml        # args: as in ServeSettings

The key is read from ``$TRACE_API_KEY`` (``api_key_env``) here, where the app is built, and only
its SHA-256 travels to the replicas.

What may change while the app runs (policies, adapters: ``serve/state.py``) reaches the
deployments as their Serve ``user_config``; everything else is init arguments. Each deployment's
version is a hash of its init arguments, so redeploying the same settings with a new state
(``serve/runner.py`` does on a reload) is a lightweight update: Serve calls ``reconfigure`` on the
running replicas, which keep serving (requests in flight finish), instead of restarting them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
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


def _pinned(deployment, init: list, user_config: dict | None):
    """``deployment`` with ``user_config`` and a version that changes only with ``init``.

    Serve restarts replicas whose version changed and only reconfigures the others; with no
    version it makes a random one per ``serve.run``. Setting it needs Serve's internal flag (the
    public ``version=`` option was removed; Serve config files get the same from their args hash).
    """
    version = hashlib.sha256(json.dumps(init, sort_keys=True, default=str).encode()).hexdigest()[:16]
    opts = {"version": version, "_internal": True}
    if user_config is not None:
        opts["user_config"] = user_config
    return deployment.options(**opts)


def _static(s: ServeSettings):
    """What a restart would be needed to change: the base model, the backend, the judge model."""
    from serve.models import build_model_table
    from serve.state import first_judge_model

    return build_model_table(s.model, {}, s.served_name), _pick_backend(s), first_judge_model(s)


def resolve_state(s: ServeSettings, static=None):
    """The policies and adapters ``s`` names, read now (``serve.state.State``); nothing is started."""
    from pathlib import Path

    from serve.state import REMOTE
    from serve.state import resolve

    table, backend, judge_spec = static or _static(s)
    base_folder = table.base_spec if Path(table.base_spec).is_dir() else None
    state = resolve(s, table.adapters, base_folder, judge_spec)
    remote = [n for n, folder in state.adapters.items() if folder.startswith(REMOTE)]
    if backend == "hf" and remote:
        raise ConfigError(f"adapters: {', '.join(remote)} are in object storage; the hf backend loads local "
                          "adapter folders (object-storage adapters are for backend: vllm)")
    if s.guard and not state.policies:
        raise ConfigError("guard: needs a policy")
    return state


def build_from_settings(s: ServeSettings, api_key: str | None = None, state=None):
    """``ServeSettings`` → a bound Serve ``Application`` (nothing is started here).

    ``state``: a ``serve.state.State`` resolved already (a reload); default: resolved now."""
    from serve.hf_backend import hf_deployment
    from serve.ingress import Gateway, key_digest
    from serve.models import ModelTable
    from serve.triage_backend import triage_deployment
    from trace_ray.config import to_dict

    static = _static(s)
    table, backend, judge_spec = static
    state = state or resolve_state(s, static)
    configs = state.user_configs()
    if api_key is None:
        api_key = os.environ.get(s.api_key_env) or None
    if backend == "vllm":
        from serve.vllm_backend import check_settings, vllm_deployment

        full = ModelTable(table.base_spec, table.base_name, dict(state.adapters))
        check_settings(full, s.vllm)
        llm = vllm_deployment(full, s.vllm)
    else:
        device = "cuda" if s.hf.num_gpus > 0 else None
        init = [table.base_spec, None, s.hf.max_batch_size, s.hf.batch_wait_timeout_s, s.hf.dtype, device]
        llm = _pinned(hf_deployment(s.hf), init + [to_dict(s.hf)], configs["generator"]).bind(*init)
    triage = None
    if state.policies or s.policy:
        judge = None
        if judge_spec is not None:
            if backend == "hf" and judge_spec == table.base_spec:
                judge = llm  # the served base answers the judge: no second copy
            else:
                init = [judge_spec, None, s.hf.max_batch_size, s.hf.batch_wait_timeout_s, s.hf.dtype, None]
                judge = _pinned(hf_deployment(s.hf).options(name="Judge"), init, {"adapters": {}}).bind(*init)
        triage = _pinned(triage_deployment(s.triage_num_cpus), [judge_spec, s.triage_num_cpus],
                         configs["triage"]).bind(judge)
    base = {"base_spec": table.base_spec, "base_name": table.base_name}
    init = [base, to_dict(s.limits), key_digest(api_key), s.guard, backend]
    gateway = Gateway.options(ray_actor_options={"num_cpus": s.gateway_num_cpus})
    return _pinned(gateway, init + [s.gateway_num_cpus], configs["gateway"]).bind(llm, triage, *init)


def build_app(args: dict):
    """Application builder for ``serve run serve.app:build_app key=value ...`` and config files.

    ``args`` follow ``ServeSettings``; nested keys may be dotted (``limits.max_items=64``).
    """
    from trace_ray.config import deep_merge, parse_overrides

    data: dict = {}
    for k, v in dict(args).items():
        if k == "adapters" and isinstance(v, str):  # CLI form: name=dir,name2=dir2
            v = [p for p in v.split(",") if p]
        if k == "policy" and isinstance(v, str) and "," in v:  # CLI form: v2=a.yaml,v3=b.yaml
            v = [p for p in v.split(",") if p]
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
