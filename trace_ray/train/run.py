"""``realign(config)``: triaged Parquet → (y_c pass) → (reference pass) → Ray Train → OUT.

Everything that can be wrong with the inputs is checked first, on the driver, before Ray or any
worker starts (``check_inputs``): the config (strict types, choices, cross-field rules), the
triaged file and its columns, the model path, the gold file, optional packages.

Outputs under ``output.dir``: ``adapter/`` or ``model/`` (+ tokenizer), ``metrics.jsonl``,
``weights.parquet`` (row, id, weight), ``run_config.yaml``, ``summary.json``,
``prepared/`` (Parquet with y_c / reference columns, when those passes ran) and
``ray_train/realign/`` (Ray Train's checkpoints; ``output.storage_path``/``realign/`` instead when
set: shared storage for multi-node clusters). Running the same config again resumes from the
latest checkpoint (Ray Train restores a run by its name and storage path).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from trace_ray.config import ConfigError, from_dict, to_dict
from trace_ray.train.config import RunConfig, used_categories

REQUIRED_COLUMNS = ("id", "prompt", "chosen", "rejected", "category")


def as_run_config(config) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return from_dict(RunConfig, config)
    from trace_ray.train.config import load_run_config

    return load_run_config(config)


def check_inputs(cfg: RunConfig) -> dict:
    """Filesystem and package checks; returns ``{"counts": {...}, "rows": n_used}``."""
    import importlib.util

    import pyarrow.parquet as pq

    from trace_ray.data.split import split_of_path
    from trace_ray.triage_output import read_triaged, read_triaged_schema

    p = Path(cfg.data.triaged)
    if split_of_path(p) in ("heldout", "validation"):
        raise ConfigError(f"data.triaged: {p} is the {split_of_path(p)} split, which is never trained on; "
                          f"train on {p.with_name('triaged.parquet')}")
    try:
        schema = read_triaged_schema(p)  # a triage output folder (with _SUCCESS) or a Parquet file
    except FileNotFoundError as e:
        raise ConfigError(f"data.triaged: {e}") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is a config problem here
        raise ConfigError(f"data.triaged: {p} is not a readable triage output ({e})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise ConfigError(f"data.triaged: {p} lacks column(s) {missing}; is it the output of `trace-ray triage`?")
    t = read_triaged(p, columns=["id", "category"])
    if cfg.data.limit:
        t = t.slice(0, cfg.data.limit)
    cats, ids = t.column("category").to_pylist(), t.column("id").to_pylist()
    counts = {c: 0 for c in ("invert", "punish", "retain", "unresolved")}
    for c in cats:
        counts[c if c in counts else "unresolved"] += 1
    used = used_categories(cfg)
    n_used = sum(counts[c] for c in used)
    # Rows sharing an id are kept apart (weights are keyed by row position), but say so: it
    # usually means duplicated source rows or a source id column that is not unique.
    used_ids = [i for i, c in zip(ids, cats) if c in used]
    duplicates = len(used_ids) - len(set(used_ids))
    if counts["invert"] + counts["punish"] == 0:
        raise ConfigError(f"data.triaged: {p} has no invert or punish rows: nothing to re-align (counts {counts})")
    if cfg.reference.mode == "precomputed" and "ref_chosen_logps" in schema.names:
        pass  # already precomputed columns are reused as they are
    name = cfg.model.name
    local_like = name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf")
    if local_like and not Path(name).expanduser().exists():
        raise ConfigError(f"model.name: {name} does not exist")
    if name.startswith("pypi:"):
        from trace_ray.models.load import PYPI_MODELS

        if name not in PYPI_MODELS:
            raise ConfigError(f"model.name: unknown {name!r}; valid: {', '.join(PYPI_MODELS)}")
    if cfg.data.gold != "auto":
        g = Path(cfg.data.gold)
        if not g.exists():
            raise ConfigError(f"data.gold: {g} does not exist")
        gm = [c for c in ("prompt", "chosen", "rejected") if c not in pq.read_schema(g).names]
        if gm:
            raise ConfigError(f"data.gold: {g} lacks column(s) {gm}")
    need = []
    if cfg.backend.kind == "deepspeed":
        need.append(("deepspeed", "backend.kind=deepspeed"))
    if cfg.logging.tensorboard:
        need.append(("tensorboardX", "logging.tensorboard"))
    if cfg.logging.mlflow_tracking_uri:
        need.append(("mlflow", "logging.mlflow_tracking_uri"))
    for mod, field in need:
        if importlib.util.find_spec(mod) is None:
            raise ConfigError(f"{field}: needs the {mod} package (pip install {mod})")
    if cfg.corrected.enabled:
        if cfg.corrected.policy and not Path(cfg.corrected.policy).exists():
            raise ConfigError(f"corrected.policy: {cfg.corrected.policy} does not exist")
        if not cfg.corrected.policy:
            raise ConfigError("corrected.policy: required when corrected.enabled (y_c must be checked compliant)")
    return {"counts": counts, "rows": n_used, "duplicate_ids": duplicates}


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """A copy with local paths made absolute on the driver (Ray Train workers run elsewhere)."""
    import copy

    cfg = copy.deepcopy(cfg)

    def fix(v: str) -> str:
        return str(Path(v).expanduser().resolve()) if v and Path(v).expanduser().exists() else v

    cfg.data.triaged = fix(cfg.data.triaged)
    if cfg.data.gold != "auto":
        cfg.data.gold = fix(cfg.data.gold)
    cfg.model.name = fix(cfg.model.name)
    cfg.corrected.model = fix(cfg.corrected.model)
    cfg.corrected.policy = fix(cfg.corrected.policy)
    cfg.output.dir = str(Path(cfg.output.dir).expanduser().resolve())
    sp = cfg.output.storage_path
    if sp and "://" not in sp:
        cfg.output.storage_path = str(Path(sp).expanduser().resolve())
    return cfg


def checkpoint_storage(cfg: RunConfig, out: Path) -> str:
    """Ray Train's ``storage_path``: ``output.storage_path`` when set, else ``OUT/ray_train``."""
    return cfg.output.storage_path or str(out / "ray_train")


def has_checkpoints(storage_path: str) -> bool:
    """Whether ``storage_path/realign`` holds a Ray Train checkpoint (local path or URI)."""
    import pyarrow.fs as pafs

    from trace_ray import storage

    fs, root = storage.resolve(storage.join(storage_path, "realign"))
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return any(i.base_name.startswith("checkpoint_") for i in infos)


def make_plan(cfg: RunConfig, n_rows: int, world: int, out_dir: Path) -> dict:
    """Steps per epoch (same on every worker: the largest shard decides), total steps, and where
    each of the ``world`` shards starts in the training rows (``offsets``)."""
    from trace_ray.train.data import balanced_bounds

    per_worker = math.ceil(n_rows / world)
    spe = max(1, math.ceil(per_worker / (cfg.train.batch_size * cfg.train.grad_accum)))
    total = cfg.train.max_steps or spe * cfg.train.epochs  # max_steps overrides epochs
    return {"steps_per_epoch": spe, "total_steps": total, "n_rows": n_rows, "world": world, "out_dir": str(out_dir),
            "offsets": [0] + balanced_bounds(n_rows, world)}


def gold_records(cfg: RunConfig) -> list[dict]:
    """The gold batch of J: the authors' construction from the triaged rows, or a given file."""
    import pyarrow.parquet as pq

    if cfg.data.gold != "auto":
        t = pq.read_table(cfg.data.gold, columns=["prompt", "chosen", "rejected"])
        return t.slice(0, cfg.impact.gold_size).to_pylist()
    from trace_ray.impact import build_gold_batch

    from trace_ray.triage_output import read_triaged

    t = read_triaged(cfg.data.triaged, columns=["id", "prompt", "chosen", "rejected", "category"])
    if cfg.data.limit:
        t = t.slice(0, cfg.data.limit)
    gold = build_gold_batch(t.to_pylist(), cfg.impact.gold_size, cfg.impact.gold_seed)
    return [{"prompt": g["prompt"], "chosen": g["chosen"], "rejected": g["rejected"]} for g in gold]


def _start_env() -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:  # pragma: no cover
        pass


def realign(config, *, fail_at_step: int | None = None) -> dict:
    """Run Stage 3 on Ray Train. ``config``: a ``RunConfig``, a dict or a YAML path.

    ``fail_at_step`` (tests): the workers raise right after the checkpoint of that step, as if
    killed; running the same config again resumes from it.
    """
    cfg = as_run_config(config)
    info = check_inputs(cfg)  # before Ray or any worker starts
    warn_duplicates(info)
    cfg = resolve_paths(cfg)
    _start_env()
    import os

    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from trace_ray.ray_utils import ensure_ray
    from trace_ray.train.data import prepare_dataset, split_shards

    out = Path(cfg.output.dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt_storage = checkpoint_storage(cfg, out)
    _write_config(cfg, out, has_checkpoints=has_checkpoints(ckpt_storage), shared=cfg.output.storage_path)
    ensure_ray()
    ds = prepare_dataset(cfg, out)
    n = ds.count()
    world = cfg.backend.num_workers
    plan = make_plan(cfg, n, world, out)
    plan["fail_at_step"] = fail_at_step
    plan["gold"] = cfg.impact.weights == "impact"
    # The workers read their shard in one go; Ray Data's per-read bars would only clutter the
    # step bar, so the shards (and gold) are created with progress bars off.
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = split_shards(ds, world)
    if plan["gold"]:
        datasets["gold"] = ray.data.from_items(gold_records(cfg)).materialize()
    use_gpu = cfg.backend.use_gpu
    env_vars = {k: os.environ[k] for k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "TOKENIZERS_PARALLELISM") if k in os.environ}
    trainer = TorchTrainer(
        _entry,
        train_loop_config={"run": to_dict(cfg), "plan": plan},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.backend.timeout_s),
        scaling_config=ray.train.ScalingConfig(
            num_workers=world if (cfg.backend.min_workers or world) == world else (cfg.backend.min_workers, world),
            use_gpu=use_gpu, resources_per_worker={"CPU": cfg.backend.cpus_per_worker},
            placement_strategy=cfg.backend.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name="realign",
            storage_path=ckpt_storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(1, cfg.train.keep_checkpoints)),
            failure_config=ray.train.FailureConfig(max_failures=cfg.backend.max_failures),
            worker_runtime_env={"env_vars": env_vars} if env_vars else None,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    try:
        result = trainer.fit()
    finally:
        ray.data.DataContext.get_current().enable_progress_bars = True
    if result.checkpoint is None:
        raise RuntimeError("realign: Ray Train finished without a final checkpoint")
    with result.checkpoint.as_directory() as d:
        outputs = collect_outputs(Path(d), out)
        resumed = json.loads((Path(d) / "trainer_state.json").read_text()).get("resumed_from", [])
    summary = {
        "output_dir": str(out), **outputs, "counts": info["counts"], "rows_trained": n,
        "duplicate_ids": info["duplicate_ids"], "steps": plan["total_steps"], "workers": world,
        "backend": cfg.backend.kind, "resumed_from": resumed, "final_metrics": _last_metrics(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def warn_duplicates(info: dict) -> None:
    if info.get("duplicate_ids"):
        import warnings

        warnings.warn(f"data.triaged: {info['duplicate_ids']} training row(s) share an id with another row; each row "
                      "keeps its own impact weight (weights.parquet has a `row` column), but check the source for "
                      "duplicated rows or a non-unique id column", stacklevel=2)


def _entry(config: dict) -> None:
    from trace_ray.train.loop import train_loop_per_worker

    train_loop_per_worker(config)


# Fields that may change between a run and its resumption (they do not change what is trained).
RESUME_FREE = ("logging", "output", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
               "backend.timeout_s", "backend.max_failures", "backend.min_workers", "backend.placement_strategy")


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "backend.deepspeed":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _write_config(cfg: RunConfig, out: Path, has_checkpoints: bool, shared: str | None = None) -> None:
    """Write OUT/run_config.yaml; refuse to resume checkpoints made with a different config.

    ``shared`` (``output.storage_path``): the checkpoints live there, not in OUT, so the config they
    were made with is kept next to them (``shared/run_config.yaml``) and compared from there — a
    fresh OUT (another driver, a rerun pipeline stage) cannot resume another run's checkpoints.
    """
    import yaml

    from trace_ray import storage

    path = out / "run_config.yaml"
    shared_path = storage.join(shared, "run_config.yaml") if shared else None
    new = to_dict(cfg)
    old_text = None
    if has_checkpoints:
        if shared_path and storage.exists(shared_path):
            old_text = storage.read_text(shared_path)
        elif path.exists():
            old_text = path.read_text()
    if old_text is not None:
        a, b = _flat(yaml.safe_load(old_text)), _flat(new)
        diff = sorted(k for k in set(a) | set(b)
                      if a.get(k) != b.get(k) and not any(k == f or k.startswith(f + ".") for f in RESUME_FREE))
        if diff:
            raise ConfigError(
                f"{'output.storage_path' if shared else 'output.dir'}: {shared or out} holds checkpoints of a run with another config (differs in "
                f"{', '.join(diff)}); use a new output.dir/output.storage_path, or delete its checkpoints to start over"
            )
    text = yaml.safe_dump(new, sort_keys=False)
    path.write_text(text)
    if shared_path:
        storage.write_text(shared_path, text)


def collect_outputs(ckpt: Path, out: Path) -> dict:
    """Copy the final checkpoint's ``adapter/``/``model/`` and ``metrics.jsonl`` into OUT, and the
    per-rank weights into ``OUT/weights.parquet``."""
    found = {}
    for name in ("adapter", "model"):
        if (ckpt / name).is_dir():
            dest = out / name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(ckpt / name, dest)
            found[name] = str(dest)
    if (ckpt / "metrics.jsonl").exists():
        shutil.copyfile(ckpt / "metrics.jsonl", out / "metrics.jsonl")
    found["metrics"] = str(out / "metrics.jsonl")
    from trace_ray.train.save import load_weights

    weights = load_weights(ckpt)
    if weights:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = sorted(weights)
        pq.write_table(pa.table({"row": rows, "id": [weights[r][0] for r in rows], "weight": [weights[r][1] for r in rows]}),
                       out / "weights.parquet")
        found["weights"] = str(out / "weights.parquet")
    return found


def _last_metrics(out: Path) -> dict:
    p = out / "metrics.jsonl"
    if not p.exists():
        return {}
    lines = [l for l in p.read_text().splitlines() if l.strip()]
    return json.loads(lines[-1]) if lines else {}
