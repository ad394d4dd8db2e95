"""Which model ids the app serves: the base model and one id per LoRA adapter.

Ids follow ``ray.serve.llm``'s convention, so clients work unchanged on the CPU and GPU paths:
the base is ``<served_name>``, an adapter ``<served_name>:<adapter>``. The bare adapter name is
accepted too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from serve.state import adapter_folders, default_adapter_name
from trace_ray.config import ConfigError


@dataclass
class ModelTable:
    base_spec: str  # what trace_ray.models.load loads
    base_name: str
    adapters: dict[str, str] = field(default_factory=dict)  # adapter name -> folder

    def ids(self) -> list[str]:
        return [self.base_name] + [f"{self.base_name}:{a}" for a in self.adapters]

    def resolve(self, requested: str | None) -> str | None:
        """Model id from a request → adapter name, or None for the base. KeyError if unknown."""
        if requested is None or requested == self.base_name:
            return None
        if ":" in requested:
            base, _, name = requested.partition(":")
            if base == self.base_name and name in self.adapters:
                return name
        elif requested in self.adapters:
            return requested
        raise KeyError(requested)


def _is_adapter(folder: str) -> bool:
    return (Path(folder) / "adapter_config.json").exists()


def _base_name(spec: str) -> str:
    if spec.startswith("pypi:"):
        return spec.split(":", 1)[1]
    if looks_like_hub_id(spec):  # Qwen/Qwen2.5-7B-Instruct → Qwen2.5-7B-Instruct
        return spec.split("/", 1)[1]
    p = Path(spec)
    name = p.stem if spec.endswith(".gguf") else p.resolve().name
    return (p.resolve().parent.name if name == "model" else name).replace(":", "-")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_like_hub_id(spec: str) -> bool:
    """``org/name`` (e.g. ``Qwen/Qwen2.5-7B-Instruct``) that is not a local path.

    A spec that exists locally is a path. Otherwise it is a hub id only when it has exactly two
    parts, is not absolute or ``./``/``~``-relative, and its first part is not a local folder (so a
    typo such as ``runs/polcy-v2`` stays a missing path, not a hub download).
    """
    if Path(spec).exists() or not HUB_ID.match(spec) or spec.startswith((".", "~")):
        return False
    return not Path(spec.split("/", 1)[0]).exists()


def build_model_table(model: str, adapters, served_name: str | None = None) -> ModelTable:
    """Resolve ``--model`` (a local model, a hub id ``org/name``, or an adapter whose base is then
    served too) and ``--adapter`` sources (``serve.state.adapter_folders``). A hub id is fetched by vLLM or transformers where the replica
    runs; a local path that does not exist is a ``FileNotFoundError`` here."""
    table_adapters: dict[str, str] = {}
    base_spec = model
    if (not model.startswith("pypi:") and not model.endswith(".gguf") and not Path(model).exists()
            and not looks_like_hub_id(model)):
        raise FileNotFoundError(f"model {model} does not exist (a hub id is written org/name, "
                                "e.g. Qwen/Qwen2.5-7B-Instruct)")
    if _is_adapter(model):
        cfg = json.loads((Path(model) / "adapter_config.json").read_text())
        base_spec = cfg.get("base_model_name_or_path") or ""
        if not base_spec:
            raise ConfigError(f"model: {model}/adapter_config.json names no base_model_name_or_path")
        table_adapters[default_adapter_name(model)] = str(model)
    for name, folder in adapter_folders(adapters).items():
        if name in table_adapters:
            raise ConfigError(f"adapters.{name}: the name is used twice")
        table_adapters[name] = folder
    return ModelTable(base_spec=base_spec, base_name=served_name or _base_name(base_spec), adapters=table_adapters)
