"""What a running app serves that may change without a restart: policies and LoRA adapters.

Sources (``ServeSettings.policy`` / ``.adapters``, the CLI's ``--policy`` / ``--adapter``) are
``[NAME=]PATH`` entries:

- a policy YAML (name: ``NAME``, else the file's stem), or a folder of them (``*.yaml``, ``*.yml``:
  one policy per file, named by its stem); the first policy is the default of ``/v1/triage``;
- an adapter folder (name: ``NAME``, else ``default_adapter_name``), or a folder whose
  sub-folders are adapters (``sub/adapter_config.json`` or ``sub/adapter/...``, as ``trace-ray
  realign`` writes ``OUT/adapter``; named ``sub``); ``s3://`` … entries are for the vLLM path.

``resolve`` reads them all into a ``State``; ``State.user_configs`` is what each deployment
receives as its Serve ``user_config`` (``reconfigure``), so a redeploy with a new state updates
the running replicas in place. Folders are scanned on every ``resolve``: a new adapter or policy
file appears at the next reload (``serve/runner.py`` polls).

Guard mode checks an answer against the policy its model was re-aligned for: ``realigned_for``
reads the run config that ``trace-ray realign`` writes beside ``OUT/adapter`` / ``OUT/model``
(``OUT/run_config.yaml`` → ``data.triaged`` → that Parquet's ``policy`` column, the triage
fingerprint ``name@version#hash``). When no served policy has that fingerprint (or there is no
run config) the default policy guards it; ``GET /v1/models`` shows both.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from trace_ray.config import ConfigError

POLICY_SUFFIXES = (".yaml", ".yml")
REMOTE = ("s3://", "gs://", "abfss://", "azure://")  # adapter URIs only the vLLM path can load


def split_source(entry: str) -> tuple[str | None, str]:
    """``"v2=runs/v2/adapter"`` → ``("v2", "runs/v2/adapter")``; ``"runs/"`` → ``(None, "runs/")``."""
    name, sep, path = entry.partition("=")
    if sep and name and "/" not in name and not name.startswith("."):
        return name, path
    return None, entry


def _as_entries(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [f"{k}={v}" for k, v in value.items()]
    return list(value)


def _add(out: dict, name: str, value: str, kind: str) -> None:
    if not name or ":" in name or "/" in name:
        raise ConfigError(f"{kind} name {name!r}: must be non-empty, without ':' or '/'")
    if name in out:
        raise ConfigError(f"{kind} name {name!r} is used twice ({out[name]} and {value}); give NAME=PATH")
    out[name] = value


def policy_files(sources) -> dict[str, str]:
    """Policy name → YAML file, in source order (folders: sorted by file name)."""
    out: dict[str, str] = {}
    for entry in _as_entries(sources):
        name, path = split_source(entry)
        p = Path(path)
        if p.is_dir():
            if name:
                raise ConfigError(f"policy {entry!r}: a folder of policies takes no NAME= (each is named by its file)")
            for f in sorted(x for x in p.iterdir() if x.suffix in POLICY_SUFFIXES and x.is_file()):
                _add(out, f.stem, str(f), "policy")
        elif p.is_file():
            _add(out, name or p.stem, str(p), "policy")
        else:
            raise ConfigError(f"policy {entry!r}: {path} does not exist")
    return out


def _adapter_dir(folder: Path) -> Path | None:
    for d in (folder, folder / "adapter"):
        if (d / "adapter_config.json").is_file():
            return d
    return None


def _complete(name: str, folder: Path) -> str:
    """``folder`` if it holds a whole adapter (config and weights), else a ConfigError: a folder
    still being copied is not loaded half-way."""
    if not any((folder / w).is_file() for w in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ConfigError(f"adapter {name}: {folder} has no adapter_model.safetensors (still being written?)")
    try:
        json.loads((folder / "adapter_config.json").read_text())
    except ValueError as e:
        raise ConfigError(f"adapter {name}: {folder}/adapter_config.json is not valid JSON ({e})") from None
    return str(folder)


def default_adapter_name(folder: str) -> str:
    """``runs/policy-v2/adapter`` → ``policy-v2`` (the trainer writes ``OUT/adapter``)."""
    p = Path(folder).resolve()
    return p.parent.name if p.name == "adapter" else p.name


def adapter_folders(sources) -> dict[str, str]:
    """Adapter name → folder (or object-storage URI), in source order."""
    out: dict[str, str] = {}
    for entry in _as_entries(sources):
        name, path = split_source(entry)
        if path.startswith(REMOTE):
            if not name:
                raise ConfigError(f"adapter {entry!r}: an object-storage adapter needs NAME=URI")
            _add(out, name, path, "adapter")
            continue
        p = Path(path)
        if (p / "adapter_config.json").is_file():
            name = name or default_adapter_name(path)
            _add(out, name, _complete(name, p), "adapter")
        elif p.is_dir() and not name:
            for sub in sorted(x for x in p.iterdir() if x.is_dir()):
                found = _adapter_dir(sub)
                if found is not None:
                    _add(out, sub.name, _complete(sub.name, found), "adapter")
        elif p.is_dir():
            raise ConfigError(f"adapters.{name}: {path} is not a peft adapter folder (no adapter_config.json)")
        else:
            raise ConfigError(f"adapter {entry!r}: {path} does not exist")
    return out


def files_signature(folder: str) -> str:
    """Size and mtime of an adapter's files: a retrained adapter in the same folder is reloaded."""
    p = Path(folder)
    if not p.is_dir():
        return folder  # object storage: vLLM loads it itself
    parts = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(p.iterdir()) if f.is_file()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def realigned_for(folder: str) -> str | None:
    """Fingerprint of the policy a ``trace-ray realign`` output (``OUT/adapter`` or ``OUT/model``) was
    re-aligned for, read from ``OUT/run_config.yaml`` → ``data.triaged``; None when unknown."""
    import yaml

    p = Path(folder)
    cfg_path = next((c for c in (p / "run_config.yaml", p.parent / "run_config.yaml") if c.is_file()), None)
    if cfg_path is None:
        return None
    try:
        triaged = ((yaml.safe_load(cfg_path.read_text()) or {}).get("data") or {}).get("triaged")
        if not triaged:
            return None
        t = Path(triaged)
        t = t if t.is_absolute() or t.exists() else cfg_path.parent / t
        import pyarrow.dataset as pads

        table = pads.dataset(str(t), format="parquet").head(1, columns=["policy"])
        return table.column("policy")[0].as_py() if table.num_rows else None
    except Exception:  # an unreadable run config or triaged file: no claim about the policy
        return None


@dataclass
class State:
    """The policies (name → ``Policy``, first = default) and adapters (name → folder) served now."""

    policies: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    realigned: dict[str, str | None] = field(default_factory=dict)  # adapter name ("" = base) -> fingerprint

    @property
    def default_policy(self) -> str | None:
        return next(iter(self.policies), None)

    def guard_policy(self, adapter: str | None) -> str | None:
        """The policy that guards answers of ``adapter`` (None = the base model)."""
        want = self.realigned.get(adapter or "")
        return next((n for n, p in self.policies.items() if p.fingerprint == want), self.default_policy)

    def describe_policies(self) -> list[dict]:
        return [{"name": n, "policy": p.name, "version": p.version, "hash": p.fingerprint.rsplit("#", 1)[1],
                 "fingerprint": p.fingerprint, "file": self.files[n], "default": n == self.default_policy}
                for n, p in self.policies.items()]

    def user_configs(self) -> dict:
        """Per deployment: what ``reconfigure`` receives (JSON-serialisable, small)."""
        guard = {"": self.guard_policy(None), **{a: self.guard_policy(a) for a in self.adapters}}
        return {
            "gateway": {"adapters": dict(self.adapters), "policies": self.describe_policies(), "guard": guard,
                        "realigned_for": {k: v for k, v in self.realigned.items()}},
            "triage": {"policies": {n: p.spec for n, p in self.policies.items()}},
            "generator": {"adapters": {a: {"path": f, "sig": files_signature(f)} for a, f in self.adapters.items()}},
        }


def resolve(settings, base_adapters: dict[str, str], base_folder: str | None, judge_spec: str | None) -> State:
    """Read every source of ``settings`` now. ``base_adapters``: the adapter given as ``--model``
    (served beside its base); ``base_folder``: the local base model folder (its own run config
    tells a merged ``OUT/model``'s policy); ``judge_spec``: the model of the app's judge deployment
    (None: the app has none). Raises ``ConfigError`` / ``PolicyError`` naming the problem."""
    from serve.triage_backend import refuse_callables
    from trace_ray.policy import load_policy

    files = policy_files(settings.policy)
    policies = {}
    for name, f in files.items():
        pol = load_policy(f)
        refuse_callables(pol)
        rule = pol.judge_rule
        if rule is not None and judge_spec is None:
            raise ConfigError(f"policy {name}: has a judge rule, but the app was started without one; restart it")
        if rule is not None and not settings.judge_model and rule.model != judge_spec:
            raise ConfigError(f"policy {name}: its judge rule names {rule.model}, another policy's names {judge_spec}; "
                              "one judge model serves every policy (set judge_model / --judge-model)")
        policies[name] = pol
    adapters = dict(base_adapters)
    for name, folder in adapter_folders(settings.adapters).items():
        _add(adapters, name, folder, "adapter")
    realigned = {a: realigned_for(f) for a, f in adapters.items()}
    realigned[""] = realigned_for(base_folder) if base_folder else None
    return State(policies=policies, files=files, adapters=adapters, realigned=realigned)


def first_judge_model(settings) -> str | None:
    """The judge deployment's model (None: no policy has a judge rule, the app needs no judge):
    ``judge_model``, else the first judge rule's model."""
    from trace_ray.policy import load_policy

    for f in policy_files(settings.policy).values():
        rule = load_policy(f).judge_rule
        if rule is not None:
            return settings.judge_model or rule.model
    return None


def config_key(user_configs: dict) -> str:
    return hashlib.sha256(json.dumps(user_configs, sort_keys=True, default=str).encode()).hexdigest()
