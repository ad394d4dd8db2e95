"""Checkpoints (resume) and the final model folder.

Checkpoint folder (one per reported step; every rank adds its own files, Ray Train merges them):
``trainer_state.json`` (rank 0: step, metrics so far, the steps the run resumed from),
``weights_rank{r}.json`` (each rank: ``{row: [id, weight]}`` for the preference rows it holds, keyed
by the row's position in the training rows, so a resumed run never re-scores at a moved θ and a
resumed run with fewer workers finds every row's weight in the union of the files),
``rng_rank{r}.pt`` (torch CPU and CUDA, Python ``random`` and NumPy generator states), and either
``trainable.pt`` + ``optimizer.pt`` + ``scheduler.pt`` (ddp backend, rank 0) or DeepSpeed's own
``ds/`` checkpoint (every rank its optimiser shard).

Final output: ``adapter/`` (peft ``save_pretrained``: ``adapter_config.json`` +
``adapter_model.safetensors``) or ``model/`` (transformers ``save_pretrained``), each with the
tokenizer; ``merge_adapter`` also writes ``model/`` with the LoRA merged into the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DS_TAG = "ds"


def rng_state() -> dict:
    """Every generator a step can draw from: torch (CPU, and each CUDA device), Python, NumPy."""
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_weights(d: Path) -> dict:
    """``{row: (id, weight)}`` from every rank's ``weights_rank*.json`` in checkpoint ``d``."""
    out = {}
    for f in sorted(d.glob("weights_rank*.json")):
        out.update({int(k): tuple(v) for k, v in json.loads(f.read_text()).items()})
    return out


def save_checkpoint(d: Path, *, rank: int, state: dict, weights: dict, model, optimizer, scheduler, engine=None):
    """Write this rank's share of a checkpoint into ``d``. Collective when ``engine`` is DeepSpeed."""
    d.mkdir(parents=True, exist_ok=True)
    (d / f"weights_rank{rank}.json").write_text(json.dumps({str(k): list(v) for k, v in weights.items()}))
    if engine is not None:
        engine.save_checkpoint(str(d), tag=DS_TAG)
    elif rank == 0:
        trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(trainable, d / "trainable.pt")
        torch.save(optimizer.state_dict(), d / "optimizer.pt")
        torch.save(scheduler.state_dict(), d / "scheduler.pt")
    torch.save(rng_state(), d / f"rng_rank{rank}.pt")
    if rank == 0:
        (d / "trainer_state.json").write_text(json.dumps(state, default=float))


def load_checkpoint(d: Path, *, rank: int, model, optimizer, scheduler, engine=None) -> dict:
    """Restore model/optimiser/schedule/RNG from ``d``; returns the trainer state."""
    state = json.loads((d / "trainer_state.json").read_text())
    if engine is not None:
        engine.load_checkpoint(str(d), tag=DS_TAG)
    else:
        trainable = torch.load(d / "trainable.pt", map_location="cpu")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in trainable.items():
                params[n].copy_(t.to(params[n].device))
        optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location="cpu"))
        scheduler.load_state_dict(torch.load(d / "scheduler.pt", map_location="cpu"))
    rf = d / f"rng_rank{rank}.pt"
    if rf.exists():  # a rank that did not exist before (more workers now) keeps its fresh seed
        set_rng_state(torch.load(rf, weights_only=False))
    return state


def consolidated_state_dict(engine) -> dict | None:
    """ZeRO-3: gather the 16-bit weights (collective: every rank calls it; rank 0 gets the dict)."""
    if engine is None or engine.zero_optimization_stage() != 3:
        return None
    return engine._zero3_consolidated_16bit_state_dict()


def save_final(d: Path, model, tokenizer, *, lora: bool, merge: bool, save_tokenizer: bool = True, state_dict=None) -> dict:
    """Write ``d/adapter`` (LoRA) or ``d/model`` (full), plus ``d/model`` merged on request."""
    out = {}
    model = getattr(model, "module", model)
    kw = {"state_dict": state_dict} if state_dict is not None else {}
    target = d / ("adapter" if lora else "model")
    model.save_pretrained(str(target), safe_serialization=True, **kw)
    out["adapter" if lora else "model"] = target
    if save_tokenizer:
        tokenizer.save_pretrained(str(target))
    if lora and merge:
        import copy

        merged = copy.deepcopy(model).merge_and_unload()  # the trained adapter model stays usable
        merged.save_pretrained(str(d / "model"), safe_serialization=True)
        if save_tokenizer:
            tokenizer.save_pretrained(str(d / "model"))
        out["model"] = d / "model"
    if lora:
        # peft records the base as it was loaded; keep it absolute so the folder loads anywhere.
        cfg_path = target / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        base = cfg.get("base_model_name_or_path")
        if base and Path(base).exists():
            cfg["base_model_name_or_path"] = str(Path(base).resolve())
            cfg_path.write_text(json.dumps(cfg, indent=2))
    return {k: str(v) for k, v in out.items()}
