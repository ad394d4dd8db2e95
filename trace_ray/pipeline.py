"""The whole chain as resumable stages: triage → realign → evaluate → serve_check.

Used by ``jobs/*.py`` (``ray job submit``) and tests. Each stage writes into ``OUT/<stage>/`` (a
local folder or an ``s3://`` / ``gs://`` URI, through :mod:`trace_ray.storage`) and finishes by
writing ``OUT/<stage>/_DONE.json`` holding the stage's *fingerprint*: a hash of its own config
section, its input files' content and the fingerprints of the stages it reads. On resubmission a
stage whose marker holds the same fingerprint is skipped; a changed input reruns that stage and
every stage after it. A stage that crashed has no marker and runs again (``realign`` then resumes
from its own Ray Train checkpoints when its folder is still there).

Exit codes (:data:`EXIT_CODES`): 0 every requested stage is done; 1 a stage failed while running;
2 the config or an input is invalid (reported before any stage starts); 3 a component the config
asks for is not installed or not built (e.g. vLLM on a CPU machine); 130 interrupted.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from trace_ray import stages as stage_impl
from trace_ray import storage
from trace_ray.config import ConfigError, from_dict, to_dict
from trace_ray.stages import ComponentMissing, StageContext, realign_dict, stage_uri

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_MISSING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = {
    EXIT_OK: "every requested stage is done (run now or skipped as already done)",
    EXIT_FAILED: "a stage failed while running (traceback above; its marker is not written)",
    EXIT_CONFIG: "invalid config or input (nothing was started)",
    EXIT_MISSING: "a component the config needs is not installed or not available",
    EXIT_INTERRUPTED: "interrupted",
}
STAGES = ("triage", "realign", "evaluate", "serve_check")
MARKER = "_DONE.json"


@dataclass
class ServeCheckConfig:
    """Stage ``serve_check``: serve the re-aligned model and answer one chat completion over HTTP."""

    prompt: str = "In one sentence, what should I do if I find a lost wallet?"
    max_tokens: int = 32
    timeout_s: int = 300
    port: int = 0  # 0 = a free port on 127.0.0.1
    settings: dict[str, Any] = field(default_factory=dict)  # extra ServeSettings (serve/settings.py), e.g. hf.num_cpus

    def validate(self):
        if self.max_tokens < 1:
            raise ConfigError(f"serve_check.max_tokens: must be >= 1, got {self.max_tokens}")


@dataclass
class PipelineConfig:
    """One YAML for the whole chain; the header of each config file gives its command.

    ``realign`` holds ``RunConfig`` fields (``trace_ray.train.config``), merged over the YAML in
    ``realign_config`` when given; ``data.triaged`` and ``output.dir`` are filled in by the
    pipeline. ``triage`` holds extra keyword arguments of ``trace_ray.triage.run_triage`` (e.g.
    ``holdout: 0.1``, ``split: train``, ``prompt_key: question``, ``chosen_key``, ``rejected_key``);
    ``evaluate`` those of ``trace_ray.evaluate_pairs.evaluate_pairs``, which scores the held-out
    split (so a config with the evaluate stage sets ``triage.holdout``). Relative paths are relative to the working
    directory (the uploaded ``--working-dir`` under ``ray job submit``).
    """

    out: str = ""  # root folder or URI of every stage's output
    data: str = ""  # preference data (path or URI)
    policy: str = ""  # the new policy YAML (path or URI)
    name: str = "trace-ray"
    format: Literal["auto", "pairs", "implicit", "pku", "hh"] = "auto"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    triage: dict[str, Any] = field(default_factory=dict)
    realign_config: str = ""
    realign: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    serve_check: ServeCheckConfig = field(default_factory=ServeCheckConfig)

    def validate(self):
        for name in ("out", "data", "policy"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required field is missing")
        for i, s in enumerate(self.stages):
            if s not in STAGES:
                raise ConfigError(f"stages[{i}]: {s!r} is not one of {', '.join(map(repr, STAGES))}")
        order = [STAGES.index(s) for s in self.stages]
        if order != sorted(set(order)):
            raise ConfigError(f"stages: must be a subset of {list(STAGES)} in that order, got {self.stages}")


def load_pipeline_config(path: str | None, overrides: list[str] | None = None) -> PipelineConfig:
    from trace_ray.config import load_config

    if path:
        local = storage.localize(path) if storage.is_remote(path) else path
        return load_config(PipelineConfig, local, overrides)
    return load_config(PipelineConfig, None, overrides)


# --------------------------------------------------------------------------------------------
# Stage bookkeeping


def fingerprint(*parts: Any) -> str:
    """sha256 (16 hex) of JSON-serialisable parts, key order independent."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def content_id(uri: str, max_hash_bytes: int = 256 << 20) -> str:
    """What identifies an input's content: sha256 of the bytes for local files up to 256 MiB,
    a per-file digest over folders, else size + mtime as the object store reports them."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    if info.type == pafs.FileType.Directory:
        files = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return fingerprint(sorted((f.path[len(path):], f.size, str(f.mtime)) for f in files if f.is_file))
    if not storage.is_remote(uri) and info.size <= max_hash_bytes:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()[:16]
    return fingerprint(info.size, str(info.mtime))


def _read_marker_at(uri: str) -> dict | None:
    m = storage.join(uri, MARKER)
    try:
        return storage.read_json(m) if storage.exists(m) else None
    except (ValueError, OSError):
        return None  # a torn or unreadable marker counts as "not done"


def _write_marker_at(uri: str, stage: str, fp: str, seconds: float, result: dict) -> None:
    storage.write_json(
        storage.join(uri, MARKER),
        {"stage": stage, "fingerprint": fp, "seconds": round(seconds, 3),
         "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "result": result},
    )


def read_marker(out: str, stage: str) -> dict | None:
    """The ``_DONE.json`` of ``OUT/<stage>``, or None when the stage has not finished."""
    return _read_marker_at(stage_uri(out, stage))


def is_done(out: str, stage: str, fp: str) -> bool:
    m = read_marker(out, stage)
    return bool(m and m.get("fingerprint") == fp)


def _log(msg: str) -> None:
    print(f"[trace-ray pipeline] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Fingerprints of each stage (computed for all stages up front, so a bad input fails early)


def plan(cfg: PipelineConfig) -> dict[str, str]:
    """``{stage: fingerprint}`` for every stage of the chain, each depending on its upstream."""
    fps: dict[str, str] = {}
    fps["triage"] = fingerprint(
        "triage", content_id(cfg.data), cfg.format, content_id(cfg.policy), cfg.triage
    )
    rd = realign_dict(cfg)
    for section, key in (("data", "triaged"), ("output", "dir")):  # filled in by the pipeline
        if isinstance(rd.get(section), dict):
            rd[section] = {k: v for k, v in rd[section].items() if k != key}
    fps["realign"] = fingerprint("realign", fps["triage"], rd)
    fps["evaluate"] = fingerprint("evaluate", fps["realign"], cfg.evaluate, content_id(cfg.policy))
    fps["serve_check"] = fingerprint("serve_check", fps["realign"], to_dict(cfg.serve_check))
    return fps


def run_stage(name: str, uri: str, fp: str, fn: Callable[[str, str], dict], force: bool = True) -> dict:
    """Run one stage into ``uri`` unless its marker already holds ``fp`` (and not ``force``).

    ``fn(local_dir, uri) -> result dict`` does the work in a local folder (uploaded when ``uri`` is
    remote); the marker ``uri/_DONE.json`` is written only after it returns. Outputs of an earlier
    run with another fingerprint are removed first.
    """
    marker = _read_marker_at(uri)
    if not force and marker and marker.get("fingerprint") == fp:
        _log(f"{name}: already done (fingerprint {fp}), skipped")
        return {"status": "skipped", "fingerprint": fp}
    if marker is not None:  # finished before, with other inputs or forced: start clean
        why = "forced" if marker.get("fingerprint") == fp else f"inputs changed ({marker.get('fingerprint')} → {fp})"
        _log(f"{name}: rerunning, {why}; removing its old outputs")
        storage.delete_dir(uri)
    _log(f"{name}: running → {uri}")
    t0 = time.perf_counter()
    with storage.staged_output(uri) as local_dir:
        result = fn(local_dir, uri) or {}
    seconds = time.perf_counter() - t0
    _write_marker_at(uri, name, fp, seconds, result)
    _log(f"{name}: done in {seconds:.1f} s")
    return {"status": "ran", "fingerprint": fp, "seconds": round(seconds, 3), "result": result}


def run_pipeline(cfg: PipelineConfig, force: list[str] | None = None, dry_run: bool = False) -> dict:
    """Run ``cfg.stages`` in order, skipping those already done with the same fingerprint.

    ``force``: stage names to rerun regardless (``["all"]`` = every stage). Returns
    ``{"stages": {name: {"status": "ran"|"skipped"|"planned", ...}}, "out": cfg.out}`` and writes it
    to ``OUT/pipeline.json``. Raises on a failing stage (no marker written for it).
    """
    force = set(force or [])
    fps = plan(cfg)
    stage_impl.validate(cfg)
    report: dict = {"out": cfg.out, "name": cfg.name, "stages": {}}
    rerun_downstream = False
    for name in cfg.stages:
        fp = fps[name]
        done = is_done(cfg.out, name, fp)
        if done and not rerun_downstream and name not in force and "all" not in force:
            _log(f"{name}: already done (fingerprint {fp}), skipped")
            report["stages"][name] = {"status": "skipped", "fingerprint": fp}
            continue
        if dry_run:
            report["stages"][name] = {"status": "planned", "fingerprint": fp}
            continue
        rerun_downstream = True  # anything after a rerun stage reruns too
        report["stages"][name] = run_stage(
            name, stage_uri(cfg.out, name), fp,
            lambda local_dir, uri, n=name: stage_impl.STAGE_FUNCS.get(n)(
                StageContext(cfg=cfg, stage=n, uri=uri, local_dir=local_dir, fingerprints=fps)),
        )
    if not dry_run:
        storage.write_json(storage.join(cfg.out, "pipeline.json"), report)
    return report


# --------------------------------------------------------------------------------------------
# One stage on its own (jobs/triage.py, jobs/realign.py): the same marker and skip logic, with
# the stage's output folder given directly instead of OUT/<stage>.


def triage_job(data: str, policy: str, out: str, format: str = "auto", force: bool = False, **options) -> dict:
    """Triage ``data`` with ``policy`` into ``out`` (``triaged.parquet``, ``summary.json``, and the
    held-out / validation splits); ``options``: more ``run_triage`` keyword arguments."""
    cfg = from_dict(PipelineConfig, {"out": out, "data": data, "policy": policy, "format": format, "stages": ["triage"],
                                     "triage": options})
    stage_impl.validate(cfg)
    fp = fingerprint("triage", content_id(data), format, content_id(policy), options)
    return run_stage("triage", out, fp, lambda local, uri: stage_impl.triage(
        StageContext(cfg=cfg, stage="triage", uri=uri, local_dir=local, fingerprints={"triage": fp})), force=force)


def realign_job(config_path: str | None, overrides: list[str] | None = None, force: bool = False) -> dict:
    """``trace-ray realign`` as a resumable job: skipped when ``output.dir`` holds a marker for
    the same config and the same triaged data; ``data.triaged`` / ``output.dir`` may be URIs."""
    from dataclasses import replace

    from trace_ray.config import load_config

    RunConfig = stage_impl.need("trace_ray.train.config", "RunConfig", "the realign job")
    realign_fn = stage_impl.need("trace_ray.train", "realign", "the realign job")
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


# --------------------------------------------------------------------------------------------
# Exit codes for entry points


def exit_code_for(exc: BaseException) -> int:
    """Map an exception to the documented exit code (see :data:`EXIT_CODES`)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, ComponentMissing):
        return EXIT_MISSING
    if isinstance(exc, ModuleNotFoundError):
        return EXIT_MISSING
    if isinstance(exc, (ConfigError, FileNotFoundError)):
        return EXIT_CONFIG
    if type(exc).__name__ == "PolicyError":  # trace_ray.policy.PolicyError(ValueError)
        return EXIT_CONFIG
    return EXIT_FAILED


def guarded(fn: Callable[[], Any], prog: str) -> int:
    """Run ``fn`` and turn what it raises into a one-line message and a meaningful exit code.

    Config/input errors print only the message (the user's mistake, no traceback); a stage that
    fails at run time prints its traceback too.
    """
    try:
        fn()
        return EXIT_OK
    except BaseException as e:  # noqa: BLE001 — every path must end in an exit code
        if isinstance(e, SystemExit):
            raise
        code = exit_code_for(e)
        if code == EXIT_FAILED:
            traceback.print_exc()
        print(f"{prog}: {EXIT_CODES[code]}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return code


def write_result(path: str | None, obj: dict) -> None:
    if path:
        storage.write_json(path, obj)


__all__ = [
    "PipelineConfig", "ServeCheckConfig", "load_pipeline_config", "run_pipeline", "plan",
    "fingerprint", "content_id", "read_marker", "run_stage", "is_done", "StageContext",
    "ComponentMissing", "exit_code_for", "guarded", "EXIT_CODES", "STAGES", "MARKER", "stage_uri", "realign_dict",
    "triage_job", "realign_job",
]
