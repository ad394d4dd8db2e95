"""Benchmark: our full TRACE training step vs TRL's ``DPOTrainer`` step, same model, batch, LoRA.

Same tiny LLaMA (hidden 128, 2 layers, the real 50,257-token GPT-2 vocabulary: ≈13.4M
parameters), same real HH-RLHF rows, fp32, LoRA r=32 on q/v (adapter-disabled reference for both:
no second model copy), batch size B, max length 256, AdamW. Each side runs in its own fresh Python
process (clean peak-RSS figure) after one warm-up step; both run back to back in one invocation,
so the ratio compares like with like on the same (possibly busy) machine.

- ``ours``: ``trace_ray.train.step`` — a mixed batch (invert, punish and retain rows together,
  impact weights attached), DPO + dual NPO + forward KL, then backward and an optimizer step: the
  exact code the Ray Train loop runs.
- ``trl``: ``trl.DPOTrainer`` (sigmoid DPO loss) on the same rows as plain preference pairs; the
  time of each optimizer step is taken between the trainer's ``on_step_begin``/``on_step_end``
  callbacks (data collation included, set-up excluded).

Target (issue 4): ours ≤ 1.3× TRL's time per sample, though ours does more (NPO on both responses
of punish rows, a KL with full logits on retain rows).

Run (CPU; a few minutes on 2 shared cores):
    .venv/bin/python benchmarks/train_step.py --out benchmarks/results/train_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import HH, ROOT, TOKENIZER, hh_pairs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(HH), help="HH-RLHF jsonl(.gz) file (default: the shared one)")
    p.add_argument("--tokenizer", default=str(TOKENIZER), help="HF tokenizer folder (default: the shared GPT-2 tokenizer)")
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps (after one warm-up step)")
    p.add_argument("--hidden", type=int, default=128, help="model hidden size")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--lora-r", type=int, default=32, help="LoRA rank (q_proj, v_proj)")
    p.add_argument("--max-length", type=int, default=256, help="max tokens per prompt+response")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads in each child")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step_cpu.json"), help="JSON output path")
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_rows(args, n: int) -> list[dict]:
    """n real HH-RLHF pairs; categories cycle invert/punish/retain (a mixed batch, as after triage)."""
    return [{**rec, "category": ("invert", "punish", "retain")[i % 3], "weight": 1.0}
            for i, rec in enumerate(hh_pairs(args.data, n))]


def build(args):
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from trace_ray.models.tiny import build_tiny_llama

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tok.pad_token = tok.eos_token
    model = build_tiny_llama(tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                             intermediate_size=4 * args.hidden, seed=0)
    model.config.pad_token_id = tok.pad_token_id
    lcfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return tok, model, lcfg


def child_ours(args) -> dict:
    import torch
    from peft import get_peft_model

    from trace_ray.train.step import StepSettings, collate, compute_loss

    tok, model, lcfg = build(args)
    torch.manual_seed(0)
    model = get_peft_model(model, lcfg)
    model.train()
    rows = load_rows(args, args.batch * (args.steps + 1))
    s = StepSettings(method="trace", beta=0.3, alpha_kl=0.1, max_length=args.max_length, nominal_batch=args.batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        batch = collate(tok, rows[i * args.batch : (i + 1) * args.batch], s)
        loss, _ = compute_loss(model, batch, s)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"step_s": times[1:]}


def child_trl(args) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok, model, lcfg = build(args)
    rows = load_rows(args, args.batch * (args.steps + 1))
    ds = Dataset.from_list([{"prompt": str(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    times, t0 = [], [0.0]

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            t0[0] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - t0[0])

    with tempfile.TemporaryDirectory() as d:
        cfg = DPOConfig(
            output_dir=d, per_device_train_batch_size=args.batch, max_steps=args.steps + 1, learning_rate=1e-4,
            beta=0.3, max_length=args.max_length, logging_steps=10**6, save_strategy="no", report_to=[],
            use_cpu=True, dataloader_num_workers=0, shuffle_dataset=False, seed=0,
        ) if "shuffle_dataset" in DPOConfig.__dataclass_fields__ else DPOConfig(
            output_dir=d, per_device_train_batch_size=args.batch, max_steps=args.steps + 1, learning_rate=1e-4,
            beta=0.3, max_length=args.max_length, logging_steps=10**6, save_strategy="no", report_to=[],
            use_cpu=True, dataloader_num_workers=0, seed=0,
        )
        torch.manual_seed(0)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lcfg,
                             callbacks=[Timer()])
        trainer.train()
    # the step timer misses the dataloader fetch that happens before on_step_begin: small here
    return {"step_s": times[1:]}


def run_child(which: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", which, *argv]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{which} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        res = child_ours(args) if args.child == "ours" else child_trl(args)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}}
    for which in ("trl", "ours"):
        r = run_child(which, argv)
        steps = r["step_s"]
        mean = sum(steps) / len(steps)
        result[which] = {"step_s_mean": mean, "step_s_min": min(steps), "samples_per_s": args.batch / mean,
                         "samples_per_s_best": args.batch / min(steps), "peak_rss_mb": r["peak_rss_mb"], "step_s": steps}
        print(f"{which}: {args.batch / mean:.2f} samples/s (best step {args.batch / min(steps):.2f}), peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    result["time_ratio_ours_over_trl"] = result["ours"]["step_s_mean"] / result["trl"]["step_s_mean"]
    result["best_step_ratio_ours_over_trl"] = result["ours"]["step_s_min"] / result["trl"]["step_s_min"]
    result["peak_rss_ratio_ours_over_trl"] = result["ours"]["peak_rss_mb"] / result["trl"]["peak_rss_mb"]
    result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"time ratio ours/TRL = {result['time_ratio_ours_over_trl']:.2f} (best steps {result['best_step_ratio_ours_over_trl']:.2f}); "
          f"peak RSS ratio = {result['peak_rss_ratio_ours_over_trl']:.2f} → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
