"""Every YAML under cluster/ and configs/real/ is valid, and the pieces reference each other
correctly: Ray's own autoscaler schema accepts the cluster configs, the KubeRay manifests name
files that exist, and the GPU demand of the paper-model configs fits the node types they run on."""

from __future__ import annotations

import copy
import importlib
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from trace_ray.config import from_dict

CLUSTER = ROOT / "cluster"
REAL = ROOT / "configs" / "real"
AUTOSCALER = ["aws.yaml", "gcp.yaml"]
IMAGE_ROOT = "/home/ray/trace-ray/"  # where cluster/Dockerfile puts the repo


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pipeline_configs() -> list[Path]:
    return sorted(p for p in REAL.glob("*.yaml") if "stages" in yaml.safe_load(p.read_text()))


def test_every_cluster_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {f.name for f in files} >= {"aws.yaml", "gcp.yaml", "runtime_env.yaml", "rayjob-realign.yaml",
                                       "rayservice-serve.yaml"}
    for f in files:
        docs = _docs(f)
        assert docs and all(isinstance(d, dict) for d in docs), f


@pytest.mark.parametrize("name", AUTOSCALER)
def test_autoscaler_config_passes_rays_schema_and_has_the_node_types(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # Ray's JSON schema + its own checks
    assert raw["provider"]["type"] == name.split(".")[0]
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head only coordinates"
    workers = {k: v for k, v in types.items() if k != raw["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) > 0]
    cpu = [v for v in workers.values() if v["resources"].get("GPU", 0) == 0 and v["resources"].get("CPU", 0) > 0]
    assert gpu and all(v["min_workers"] == 0 for v in gpu), "a GPU worker type that scales from zero"
    assert cpu and all(v["min_workers"] == 0 for v in cpu), "a CPU worker type for rule triage"
    assert sum(v["max_workers"] for v in workers.values()) <= raw["max_workers"]
    # token auth: the token file goes to every node and every `ray start` turns it on
    assert "~/.ray/auth_token" in raw["file_mounts"]
    for cmd in raw["head_start_ray_commands"][1:] + raw["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd


def _gpu_capacity_autoscaler(raw: dict, cpus_per_worker: int) -> int:
    """How many 1-GPU Ray Train workers (each with ``cpus_per_worker`` CPUs) the cluster can hold."""
    total = 0
    for v in raw["available_node_types"].values():
        r = v["resources"]
        if r.get("GPU", 0) > 0:
            per_node = min(int(r["GPU"]), int(r.get("CPU", 0)) // cpus_per_worker)
            total += per_node * v.get("max_workers", 0)
    return total


def _gpu_capacity_kuberay(spec: dict, cpus_per_worker: int) -> int:
    total = 0
    for g in spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        if gpus:
            total += min(gpus, int(limits["cpu"]) // cpus_per_worker) * g["maxReplicas"]
    return total


def _run_config_of(pipeline_yaml: Path):
    from trace_ray.pipeline import PipelineConfig, realign_dict
    from trace_ray.train.config import RunConfig

    cfg = from_dict(PipelineConfig, yaml.safe_load(pipeline_yaml.read_text()))
    d = realign_dict(cfg)
    d.setdefault("data", {})["triaged"] = "from-triage.parquet"
    d.setdefault("output", {})["dir"] = "out"
    return cfg, from_dict(RunConfig, d)


@pytest.mark.parametrize("cfg_path", _pipeline_configs(), ids=lambda p: p.name)
def test_real_pipeline_configs_validate(cfg_path):
    text = cfg_path.read_text()
    assert text.startswith("#") and "jobs/pipeline.py --config configs/real/" + cfg_path.name in text
    cfg, run = _run_config_of(cfg_path)
    assert cfg.format == "pku" and Path(ROOT / cfg.policy).exists()
    if run.backend.use_gpu:  # the paper models: they must fit every cluster config we ship
        for name in AUTOSCALER:
            raw = yaml.safe_load((CLUSTER / name).read_text())
            assert _gpu_capacity_autoscaler(raw, run.backend.cpus_per_worker) >= run.backend.num_workers, name
        assert run.backend.kind == "deepspeed" and run.backend.zero_stage == 3
        # GPU workers are on other nodes than the driver: checkpoints on storage all of them reach
        assert run.output.storage_path and run.output.storage_path.startswith(("s3://", "gs://"))
        assert run.output.storage_path.startswith(cfg.out.rstrip("/") + "/")  # one per run
    # evaluate's keys are arguments of the evaluation function
    import inspect

    from trace_ray.evaluate_pairs import evaluate_pairs

    params = inspect.signature(evaluate_pairs).parameters
    assert set(cfg.evaluate) <= set(params)


def test_paper_models_are_configured():
    names = {yaml.safe_load(p.read_text())["realign"]["model"]["name"] for p in _pipeline_configs()}
    assert {"Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B-Instruct", "google/gemma-2-9b-it",
            "pypi:smollm2"} <= names


def test_gpu_check_run_config_validates():
    from trace_ray.train.config import load_run_config

    cfg = load_run_config(REAL / "smollm2_gpu_check.yaml")
    assert cfg.backend.kind == "deepspeed" and cfg.backend.zero_stage == 3 and cfg.backend.use_gpu


def _kuberay(kind: str) -> dict:
    docs = [d for f in (CLUSTER / "kuberay").glob("*.yaml") for d in _docs(f) if d.get("kind") == kind]
    assert len(docs) == 1, kind
    assert docs[0]["apiVersion"] == "ray.io/v1"
    return docs[0]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == importlib.import_module("ray").__version__
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["name"] == "ray-head"
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names))
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    for c in [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]
    ]:
        env = {e["name"] for e in c.get("env", [])}
        assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env, "token auth on every pod"


def test_rayjob_references_existing_files_and_fits_its_groups():
    job = _kuberay("RayJob")["spec"]
    spec = job["rayClusterSpec"]
    _check_cluster_spec(spec)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [g for g in groups.values() if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and all(g["minReplicas"] == 0 for g in gpu), "GPU workers scale from zero"
    assert any(g not in gpu for g in groups.values()), "a CPU group for rule triage"
    entry = job["entrypoint"].split()
    script, config = entry[1], entry[entry.index("--config") + 1]
    for p in (script, config):
        assert p.startswith(IMAGE_ROOT) and (ROOT / p[len(IMAGE_ROOT):]).exists(), p
    _, run = _run_config_of(ROOT / config[len(IMAGE_ROOT):])
    assert _gpu_capacity_kuberay(spec, run.backend.cpus_per_worker) >= run.backend.num_workers
    yaml.safe_load(job["runtimeEnvYAML"])


def test_rayservice_builds_settings_of_the_serving_app():
    svc = _kuberay("RayService")["spec"]
    _check_cluster_spec(svc["rayClusterConfig"])
    apps = yaml.safe_load(svc["serveConfigV2"])["applications"]
    assert apps
    from serve.settings import ServeSettings

    for app in apps:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        s = from_dict(ServeSettings, app["args"])
        assert s.backend == "vllm" and s.vllm.lora_path.startswith(("s3://", "gs://"))
        assert (ROOT / s.policy[len(IMAGE_ROOT):]).exists()


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))


def test_commands_in_headers_name_existing_files():
    """`--config X`, `-f X` and `--runtime-env X` in every header point at files in the repo."""
    pat = re.compile(r"(?:--config|-f|--runtime-env)\s+(\S+\.yaml)")
    for f in list(CLUSTER.rglob("*.yaml")) + list(REAL.glob("*.yaml")) + [CLUSTER / "Dockerfile"]:
        header = "\n".join(l for l in f.read_text().splitlines() if l.startswith("#"))
        for ref in pat.findall(header):
            ref = ref[len(IMAGE_ROOT):] if ref.startswith(IMAGE_ROOT) else ref
            assert (ROOT / ref).exists(), f"{f.name} names {ref}"
