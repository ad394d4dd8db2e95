"""Every YAML under configs/ loads and validates with its own loader (configs double as docs).

Kinds, by content: a policy (``rules``) → ``trace_ray.policy.load_policy``; a run config
(``model`` + ``output``/``data``) → ``RunConfig``; a pipeline config (``stages``/``realign``) →
``trace_ray.pipeline.PipelineConfig`` with its ``realign`` section checked as a ``RunConfig``; a
real-model benchmark config (``methods`` + ``lrs``) → ``trace_ray.real_benchmark`` with its
``realign`` section checked as a ``RunConfig`` for every compared method.
A kind whose loader is not importable is skipped with its reason; a file of no known kind fails.
Every run config must start with a comment giving the command that runs it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def kind_of(data) -> str:
    if not isinstance(data, dict):
        return "unknown"
    if "rules" in data:
        return "policy"
    if "methods" in data and "lrs" in data:
        return "benchmark"
    if "stages" in data or "realign" in data:
        return "pipeline"
    if "model" in data and ("output" in data or "data" in data):
        return "run"
    return "unknown"


def _need(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ModuleNotFoundError, AttributeError) as e:
        pytest.skip(f"{module}.{name} not available yet: {e}")


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_config_loads_and_validates(path: Path):
    from trace_ray.config import from_dict

    data = yaml.safe_load(path.read_text())
    kind = kind_of(data)
    assert kind != "unknown", f"{path}: not a policy, run config or pipeline config"
    if kind == "policy":
        _need("trace_ray.policy", "load_policy")(path)
        return
    RunConfig = _need("trace_ray.train.config", "RunConfig")
    if kind == "run":
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{path}: a run config starts with the command that runs it"
        assert "trace-ray" in path.read_text().split("\n\n")[0] or "train_local" in path.read_text()
        from_dict(RunConfig, data)
        return
    if kind == "benchmark":
        from trace_ray.config import deep_merge
        from trace_ray.real_benchmark import METHODS, load_bench_config

        cfg = load_bench_config(path)
        cfg.validate()
        for method in cfg.methods:
            from_dict(RunConfig, deep_merge(deep_merge(cfg.realign, METHODS[method]),
                                            {"data": {"triaged": "x.parquet"}, "output": {"dir": "x"}}))
        return
    PipelineConfig = _need("trace_ray.pipeline", "PipelineConfig")
    from_dict(PipelineConfig, data)
    realign = dict(data.get("realign") or {})
    realign.setdefault("data", {}).setdefault("triaged", "filled-in-by-the-pipeline.parquet")
    realign.setdefault("output", {}).setdefault("dir", "filled-in-by-the-pipeline")
    from_dict(RunConfig, realign)


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"realign_tiny.yaml", "realign_deepspeed_zero2.yaml", "realign_zero3_gpu.yaml"} <= names
