"""GPU check, step zero3_vocab: DeepSpeed ZeRO-3 training steps through ``trace_ray.train.realign``
with a 151,936-token vocabulary (Qwen2.5's) on CUDA, bf16 (DeepSpeed's bf16 mode, fp32 master
weights), LoRA, impact weights by finite differences in fp32.

Label log-probs and the retain KL go through the LM head ~55 positions at a time with this
vocabulary, so the short and the ~900-token rows of the batch take very different numbers of
chunks, each a gather of the partitioned head and a reentrant-checkpointed recompute in the
backward. One GPU holds one rank (NCCL does not put two ranks on one device), so this checks the
ZeRO-3 chunk path, its checkpointing and bf16 on CUDA; that the ranks agree on the number of head
calls whatever their rows is tested on 2 CPU workers (tests/test_train_ray.py).

  python scripts/gpu/zero3_vocab.py OUT                  # after scripts/gpu/prepare.py OUT (its tokenizer)
  python scripts/gpu/zero3_vocab.py OUT --cpu --tokenizer DIR   # check this script on CPU (gloo)

Writes OUT/zero3_vocab.json: ok (2 losses per step, finite, first = the closed form at θ = θ_ref),
vocabulary, chunk size, losses, seconds.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

VOCAB = 151_936


def rows() -> list[dict]:
    """Invert / punish / retain rows, half with a few-token answer, half with ~900 tokens."""
    from trace_ray.data.schema import row_id

    cats = [("invert", "non_compliant", "compliant"), ("punish", "non_compliant", "non_compliant"),
            ("retain", "compliant", "non_compliant")]
    out = []
    for i in range(12):
        cat, cv, rv = cats[i % 3]
        body = " ".join(f"step {k}: do the next part of the plan." for k in range(110)) if i % 2 else "ok"
        prompt, chosen, rejected = f"How do I do task {i}?", f"Sure. {body}", f"No. {body[::-1]}"
        out.append({"id": row_id(prompt, chosen, rejected), "prompt": prompt, "chosen": chosen, "rejected": rejected,
                    "meta": "{}", "chosen_verdict": cv, "rejected_verdict": rv, "reasons": "{}", "category": cat,
                    "policy": "gpu-check@1#000000000000"})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: OUT/model from prepare.py)")
    p.add_argument("--cpu", action="store_true", help="run on CPU (DS_ACCELERATOR=cpu, gloo) to check the script")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from trace_ray.data.schema import TRIAGED
    from trace_ray.logprobs import CHUNK_ELEMENTS
    from trace_ray.models.tiny import build_tiny_llama
    from trace_ray.train import realign

    if args.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = Path(args.out).resolve()
    work = out / "zero3_vocab"
    tok = AutoTokenizer.from_pretrained(args.tokenizer or str(out / "model"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = build_tiny_llama(tok, hidden_size=256, num_layers=2, num_heads=4, seed=0)
    model.resize_token_embeddings(VOCAB, mean_resizing=False)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    pq.write_table(pa.Table.from_pylist(rows(), schema=TRIAGED), work / "triaged.parquet")
    t0 = time.perf_counter()
    summary = realign({
        "data": {"triaged": str(work / "triaged.parquet"), "max_length": 1024},
        "model": {"name": str(work / "model"), "attn_implementation": "sdpa",
                  "lora": {"enabled": True, "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
        "impact": {"weights": "impact", "method": "fd", "gold_size": 6, "batch_size": 4},
        "optim": {"lr": 1e-4},
        "train": {"batch_size": 4, "max_steps": args.steps, "checkpoint_every": 2, "mixed_precision": "bf16"},
        "backend": {"kind": "deepspeed", "zero_stage": 3, "num_workers": 1, "use_gpu": not args.cpu},
        "output": {"dir": str(work / "realign")},
        "logging": {"progress": False},
    })
    lines = [json.loads(l) for l in (work / "realign" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    losses = [l["loss"] for l in lines]
    result = {
        "ok": len(losses) == args.steps and all(math.isfinite(x) for x in losses)
              and abs(lines[0]["raw_L_I"] - math.log(2)) < 1e-3,  # θ = θ_ref at step 1: reversed DPO = ln 2
        "vocabulary": VOCAB, "positions_per_chunk": CHUNK_ELEMENTS // VOCAB, "losses": losses,
        "raw_L_I_step1": lines[0]["raw_L_I"], "adapter": summary.get("adapter"),
        "seconds": round(time.perf_counter() - t0, 1), "device": "cpu" if args.cpu else "cuda",
    }
    (out / "zero3_vocab.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
