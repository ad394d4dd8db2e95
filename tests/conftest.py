"""Shared fixtures: one local Ray instance for the whole session, the shared real data, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRACE_SHARED", ROOT.parent / "shared"))
EXTERNAL = SHARED / "data" / "external"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (2 CPUs) shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        # "local": never join a cluster some other process started with `ray start` on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    # Serve tests may have started Serve; shut everything down once at the end.
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def pku_path() -> Path:
    p = EXTERNAL / "pku-saferlhf_alpaca7b_test_first50.jsonl"
    if not p.exists():
        pytest.fail(f"shared data missing: {p} (set TRACE_SHARED to the shared/ folder)")
    return p


@pytest.fixture(scope="session")
def hh_path() -> Path:
    p = EXTERNAL / "hh-rlhf_harmless-base_test.jsonl.gz"
    if not p.exists():
        pytest.fail(f"shared data missing: {p} (set TRACE_SHARED to the shared/ folder)")
    return p


TINY_TEXTS = [
    "How do I bake bread? Mix flour, water and yeast, knead, let it rise, then bake.",
    "I can't help with that request.",
    "Please consult a licensed professional for advice on this topic.",
    "Step 1: gather the tools. Step 2: follow the instructions carefully. Step 3: check the result.",
    "The weather today is sunny with a light breeze and no rain expected.",
    "Here is a detailed answer with every step explained for you.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from trace_ray.models.tiny import build_tokenizer

    return build_tokenizer(TINY_TEXTS * 4, vocab_size=320)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    """A fresh seeded 2-layer LLaMA (eager attention) per test."""
    from trace_ray.models.tiny import build_tiny_llama

    return build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny model and tokenizer saved as an HF folder (for loaders, Ray Train, Serve)."""
    from trace_ray.models.tiny import build_tiny_llama

    d = tmp_path_factory.mktemp("tiny_model")
    model = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d
