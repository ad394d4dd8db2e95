"""The SynthShift reference model: a tiny LLaMA trained on CPU, aligned to the OLD policy, cached.

Recipe (all seeded; the cache key is a hash of it):
1. a byte-level BPE tokenizer over every text of the world (no unknown words);
2. ``styles`` stage ("pretraining"): supervised fine-tuning on every response style with
   topic-dependent mixes (the reference's style choice then depends on the topic, as a real
   model's does), over every object and phrasing but never an exact val/test prompt;
3. ``old`` stage: supervised fine-tuning on the old policy's preferred behaviour (detail-heavy
   answers everywhere, topic-dependent hedging of 5–30 %) on the train prompts, i.e. the model a deployment would have
   been aligned to. (Best-of-n / SFT-on-preferred alignment, not DPO: it is cheaper and gives the
   same starting point for every method.)

The result is a plain transformers folder (``config.json``, weights, tokenizer with a chat template)
under ``.cache/trace-ray/reference-<hash12>/``, reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("TRACE_RAY_CACHE", Path(__file__).resolve().parents[2] / ".cache" / "trace-ray"))


@dataclass
class ReferenceRecipe:
    world_seed: int = 0
    seed: int = 0
    vocab_size: int = 700
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    styles_steps: int = 300
    old_steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    max_length: int = 96
    version: int = 5  # bump when the code of the recipe changes meaning

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


QUICK_RECIPE = ReferenceRecipe(hidden_size=64, num_layers=2, styles_steps=120, old_steps=80, batch_size=24)


def encode_sft(tokenizer, prompts: list[str], responses: list[str], max_length: int):
    """Right-padded batch: ``input_ids``, ``attention_mask`` [B, T] and ``labels`` [B, T]
    (-100 on prompt and padding; the response is followed by EOS so generation stops)."""
    import torch

    from trace_ray.chat import prompt_ids

    rows, labels = [], []
    for p, r in zip(prompts, responses):
        pi = prompt_ids(tokenizer, p)
        ri = tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (pi + ri)[:max_length]
        lab = ([-100] * len(pi) + ri)[:max_length]
        rows.append(ids)
        labels.append(lab)
    T = max(len(x) for x in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    lab_t = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        lab_t[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attn, "labels": lab_t}


def sft(model, tokenizer, pairs: list[tuple[str, str]], steps: int, batch_size: int, lr: float,
        max_length: int, seed: int, desc: str = "sft") -> list[float]:
    """Plain next-token training on (prompt, response) pairs; returns the loss per step."""
    import torch
    from tqdm import tqdm

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / max(steps, 1)))
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc=desc, leave=False, mininterval=2):
        batch = rng.sample(pairs, min(batch_size, len(pairs)))
        enc = encode_sft(tokenizer, [p for p, _ in batch], [r for _, r in batch], max_length)
        out = model(**enc)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses


def build_reference(recipe: ReferenceRecipe, out_dir: str | Path) -> Path:
    """Train the reference per ``recipe`` and save it (model + tokenizer + ``recipe.json``)."""
    import torch

    from trace_ray.data.synthshift import WorldConfig, all_texts, build_world, sft_texts
    from trace_ray.models.tiny import build_tiny_llama, build_tokenizer

    torch.manual_seed(recipe.seed)
    t0 = time.time()
    world = build_world(WorldConfig(seed=recipe.world_seed))
    tok = build_tokenizer(all_texts(world), vocab_size=recipe.vocab_size)
    model = build_tiny_llama(tok, hidden_size=recipe.hidden_size, num_layers=recipe.num_layers,
                             num_heads=recipe.num_heads, seed=recipe.seed)
    l1 = sft(model, tok, sft_texts(world, "styles", recipe.seed), recipe.styles_steps, recipe.batch_size,
             recipe.lr, recipe.max_length, recipe.seed, desc="reference: all styles")
    l2 = sft(model, tok, sft_texts(world, "old", recipe.seed), recipe.old_steps, recipe.batch_size, recipe.lr / 3,
             recipe.max_length, recipe.seed + 1, desc="reference: old policy")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = {"recipe": asdict(recipe), "key": recipe.key(), "seconds": round(time.time() - t0, 1),
            "loss_styles_last": l1[-1] if l1 else None, "loss_old_last": l2[-1] if l2 else None}
    (tmp / "recipe.json").write_text(json.dumps(info, indent=2))
    if out_dir.exists():  # another process won the race; keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    return out_dir


def get_reference(recipe: ReferenceRecipe | None = None, cache_dir: str | Path | None = None) -> Path:
    """The cached reference folder for ``recipe`` (built on first use)."""
    recipe = recipe or ReferenceRecipe()
    folder = Path(cache_dir or DEFAULT_CACHE) / f"reference-{recipe.key()}"
    if (folder / "recipe.json").exists():
        return folder
    return build_reference(recipe, folder)
