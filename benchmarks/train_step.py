"""Benchmark: whole training runs of our TRACE step against the TRACE authors' training loop and TRL's
``DPOTrainer``, same model, same rows, same batch; samples/s and peak memory (issue 16 item 5).

Same tiny LLaMA (hidden 128, 2 layers, the real 50,257-token GPT-2 vocabulary: ≈13.4M parameters),
same real HH-RLHF rows (the first whose prompt fits in half of ``max_length``; categories cycling
invert, punish, retain), fp32, LoRA r=32 on q/v, batch B,
max length 256, AdamW, ``--steps`` optimizer steps. Each side runs in its own fresh Python process
(its peak RSS is its own), one after the other in one invocation, so the ratios compare like with
like on the same (possibly busy) machine; the load average is recorded.

- ``ours``: ``trace_ray.train.step`` — a mixed batch (invert, punish and retain rows together),
  DPO + dual NPO + the forward KL on retain rows (computed a chunk of positions at a time), then
  backward and an optimizer step: the code the Ray Train loop runs. Reference: the adapter-disabled
  base (no second model).
- ``ours_full_kl`` (``--with-full-kl``): the same, with the retain KL taken the pre-issue-16 way, on
  full ``[rows, tokens, vocabulary]`` logits of policy and reference (``losses.forward_kl``): what
  the chunked KL saves.
- ``authors``: the TRACE authors' own training loop, ``TRACETrainer`` from ``src/trace.py`` of
  respailab/TRACE (``--authors-repo DIR``: a checkout; nothing of it is in this repository), driven
  by the HF ``Trainer`` as their ``main`` does: per sample, one forward per response with
  full-vocabulary log-softmax, a separate frozen reference copy, their tokenisation (padded to
  ``max_length``). Without ``--authors-repo`` this side is skipped and the JSON says so.
- ``trl``: ``trl.DPOTrainer`` (sigmoid DPO) on the same rows as plain preference pairs.

Per side: ``run_s`` (the training loop, first step included), ``samples_per_s`` = rows / run_s,
``step_s`` (per optimizer step, from the loop or the trainer's step callbacks), ``peak_rss_mb``
(``ru_maxrss`` of the process), ``rss_start_mb`` (after building the model, before training) and
``peak_rss_above_start_mb``. ``--vocabs 50257,151936`` runs every side once per vocabulary size
(the GPT-2 tokenizer's ids are a subset of a larger one) and reports how each side's peak grows.
glibc keeps freed large blocks in its heap once its mmap threshold has grown, so RSS also counts
memory that is free; ``--malloc-mmap-threshold 131072`` (``MALLOC_MMAP_THRESHOLD_`` in the
children) returns them to the system, so RSS follows live memory. The JSON records which.

Run (CPU; some minutes on 2 shared cores):
    .venv/bin/python benchmarks/train_step.py --authors-repo /path/to/TRACE --with-full-kl \
        --out benchmarks/results/train_step_cpu.json
    .venv/bin/python benchmarks/train_step.py --authors-repo /path/to/TRACE --with-full-kl \
        --sides authors,ours_full_kl,ours --vocabs 50257,151936 --malloc-mmap-threshold 131072 \
        --out benchmarks/results/train_step_vocab_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import HH, ROOT, TOKENIZER, hh_pairs

AUTHORS_REPO = "respailab/TRACE"
AUTHORS_FILES = ("src/trace.py", "src/utils/losses.py", "src/utils/datamodule.py", "src/utils/reward.py", "src/utils/common.py")
SIDES = ("trl", "authors", "ours_full_kl", "ours")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(HH), help="HH-RLHF jsonl(.gz) file (default: the shared one)")
    p.add_argument("--tokenizer", default=str(TOKENIZER), help="HF tokenizer folder (default: the shared GPT-2 tokenizer)")
    p.add_argument("--batch", type=int, default=8, help="rows per optimizer step, every side")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps of each whole run")
    p.add_argument("--hidden", type=int, default=128, help="model hidden size")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--vocabs", default="50257", help="comma-separated model vocabulary sizes; every side runs at each")
    p.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)  # set per child
    p.add_argument("--malloc-mmap-threshold", type=int, default=None,
                   help="MALLOC_MMAP_THRESHOLD_ for the children (e.g. 131072: RSS then follows live memory)")
    p.add_argument("--lora-r", type=int, default=32, help="LoRA rank (q_proj, v_proj)")
    p.add_argument("--max-length", type=int, default=256, help="max tokens per prompt+response")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads in each child")
    p.add_argument("--authors-repo", default=None,
                   help=f"a checkout of {AUTHORS_REPO} (its src/trace.py is imported, not copied); without it the "
                        "authors' side is skipped")
    p.add_argument("--with-full-kl", action="store_true", help="also run ours with the retain KL on full logits (before issue 16)")
    p.add_argument("--sides", default=None, help=f"comma-separated subset of {','.join(SIDES)}")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step_cpu.json"), help="JSON output path")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_rows(args, n: int) -> list[dict]:
    """The first n real HH-RLHF pairs whose prompt takes at most half of ``max_length`` tokens (the
    authors' tokenisation fails on a prompt longer than ``max_length``: its label list outgrows the
    padded ids); categories cycle invert/punish/retain (a mixed batch, as after triage)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    fit = [r for r in hh_pairs(args.data, 40 * n) if len(tok(str(r["prompt"]))["input_ids"]) <= args.max_length // 2]
    if len(fit) < n:
        raise SystemExit(f"only {len(fit)} HH pairs have a prompt of at most {args.max_length // 2} tokens")
    return [{**rec, "category": ("invert", "punish", "retain")[i % 3], "weight": 1.0} for i, rec in enumerate(fit[:n])]


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
    if args.vocab and args.vocab != model.config.vocab_size:
        model.resize_token_embeddings(args.vocab, mean_resizing=False)
    model.config.pad_token_id = tok.pad_token_id
    lcfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return tok, model, lcfg


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def full_logits_kl(model, batch, ref_model=None):
    """The retain KL as it was before issue 16: full [N, T, V] logits of policy and reference."""
    import torch

    from trace_ray.logprobs import _inputs, _logits, _label_logps, reference_view
    from trace_ray.losses import forward_kl

    x = _inputs(model, batch)
    logits = _logits(model, x)
    with torch.no_grad(), reference_view(model, ref_model) as ref:
        ref_logits = _logits(ref, x)
    tok, _ = _label_logps(logits[x["sel"]], x["labels"])
    logps = torch.zeros(logits.shape[0]).index_add(0, x["rows"], tok)
    return forward_kl(ref_logits, logits, x["sel"]), logps


def child_ours(args, full_kl: bool) -> dict:
    import torch
    from peft import get_peft_model

    import trace_ray.train.step as step_mod
    from trace_ray.train.step import StepSettings, collate, compute_loss

    if full_kl:
        step_mod.kl_and_logps = full_logits_kl
    tok, model, lcfg = build(args)
    torch.manual_seed(0)
    model = get_peft_model(model, lcfg)
    model.train()
    rows = load_rows(args, args.batch * args.steps)
    s = StepSettings(method="trace", beta=0.3, alpha_kl=0.1, max_length=args.max_length, nominal_batch=args.batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    start = rss_mb()
    times, t0 = [], time.perf_counter()
    for i in range(args.steps):
        t = time.perf_counter()
        batch = collate(tok, rows[i * args.batch : (i + 1) * args.batch], s)
        loss, _ = compute_loss(model, batch, s)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"run_s": time.perf_counter() - t0, "step_s": times, "rss_start_mb": start}


class _StepTimer:
    """HF Trainer callback: seconds per optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        times, t0 = [], [0.0]

        class Timer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                t0[0] = time.perf_counter()

            def on_step_end(self, *a, **k):
                times.append(time.perf_counter() - t0[0])

        self.callback, self.times = Timer(), times


def child_trl(args) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok, model, lcfg = build(args)
    rows = load_rows(args, args.batch * args.steps)
    ds = Dataset.from_list([{"prompt": str(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    timer = _StepTimer()
    with tempfile.TemporaryDirectory() as d:
        cfg = DPOConfig(
            output_dir=d, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-4,
            beta=0.3, max_length=args.max_length, logging_steps=10**6, save_strategy="no", report_to=[],
            use_cpu=True, dataloader_num_workers=0, seed=0,
            **({"shuffle_dataset": False} if "shuffle_dataset" in DPOConfig.__dataclass_fields__ else {}),
        )
        torch.manual_seed(0)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lcfg,
                             callbacks=[timer.callback])
        start = rss_mb()
        t0 = time.perf_counter()
        trainer.train()
        run_s = time.perf_counter() - t0
    return {"run_s": run_s, "step_s": timer.times, "rss_start_mb": start}


def authors_module(repo: str):
    """``src/trace.py`` of the authors' checkout, imported under its own name (it puts its ``src/``
    on sys.path for its ``utils`` package, as when run as a script)."""
    import importlib.util

    path = Path(repo) / "src" / "trace.py"
    spec = importlib.util.spec_from_file_location("respailab_trace", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def child_authors(args) -> dict:
    """Their training phase as their ``main`` runs it: a frozen reference copy, LoRA, their
    ``TRACETrainer`` (per-sample loss loop) under the HF ``Trainer`` with their collator; the rows
    carry their upper-case categories and an ``impact_score`` of 1 (the weights do not change the
    cost). Model, LoRA and optimiser settings are this benchmark's, the same for every side."""
    import copy
    import tempfile

    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import TrainingArguments

    mod = authors_module(args.authors_repo)
    tok, model, lcfg = build(args)
    ref_model = copy.deepcopy(model)
    ref_model.requires_grad_(False)
    torch.manual_seed(0)
    model = get_peft_model(model, lcfg)
    rows = load_rows(args, args.batch * args.steps)
    data = [{"prompt": str(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"],
             "category": r["category"].upper(), "impact_score": 1.0} for r in rows]
    timer = _StepTimer()
    with tempfile.TemporaryDirectory() as d:
        targs = TrainingArguments(
            output_dir=d, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-4,
            logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
            remove_unused_columns=False, seed=0,
        )
        trainer = mod.TRACETrainer(ref_model=ref_model, tokenizer=tok, beta=0.3, alpha_kl=0.1, max_length=args.max_length,
                                   model=model, args=targs, train_dataset=Dataset.from_list(data),
                                   data_collator=mod._trace_collator, callbacks=[timer.callback])
        start = rss_mb()
        t0 = time.perf_counter()
        trainer.train()
        run_s = time.perf_counter() - t0
    return {"run_s": run_s, "step_s": timer.times, "rss_start_mb": start}


def authors_provenance(repo: str) -> dict:
    root = Path(repo)
    files = {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in AUTHORS_FILES if (root / f).exists()}
    info = {"repo": AUTHORS_REPO, "path": str(root), "files_sha256": files}
    for name in ("PROVENANCE.json",):
        if (root / name).exists():
            info["provenance"] = json.loads((root / name).read_text())
    try:
        info["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def run_child(which: str, argv: list[str], vocab: int, mmap_threshold: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--vocab", str(vocab), *argv]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{which} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def ratios_of(runs: dict) -> dict:
    out = {}
    for base in ("authors", "trl", "ours_full_kl"):
        if base in runs and "ours" in runs:
            o, b = runs["ours"], runs[base]
            out[f"ours_vs_{base}"] = {"samples_per_s": o["samples_per_s"] / b["samples_per_s"],
                                      "peak_rss": o["peak_rss_mb"] / b["peak_rss_mb"],
                                      "peak_rss_above_start": o["peak_rss_above_start_mb"] / b["peak_rss_above_start_mb"]}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        fn = {"ours": lambda: child_ours(args, False), "ours_full_kl": lambda: child_ours(args, True),
              "trl": lambda: child_trl(args), "authors": lambda: child_authors(args)}[args.child]
        res = fn()
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    argv = list(argv if argv is not None else sys.argv[1:])
    drop = {"--vocabs", "--out", "--sides", "--malloc-mmap-threshold"}  # handled here, not by the children
    child_argv = [a for i, a in enumerate(argv) if a.split("=")[0] not in drop and (i == 0 or argv[i - 1] not in drop)]
    sides = args.sides.split(",") if args.sides else [s for s in SIDES if s != "ours_full_kl" or args.with_full_kl]
    vocabs = [int(v) for v in args.vocabs.split(",")]
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("child", "out", "sides", "vocab")},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
              "rows_per_run": args.batch * args.steps, "sides": sides,
              "memory_accounting": ("MALLOC_MMAP_THRESHOLD_=%d: RSS follows live memory" % args.malloc_mmap_threshold
                                    if args.malloc_mmap_threshold else "glibc default: RSS includes freed heap blocks")}
    if "authors" in sides and not args.authors_repo:
        sides.remove("authors")
        result["authors_skipped"] = "no --authors-repo given: the authors' loop was not measured"
    if args.authors_repo:
        result["authors_code"] = authors_provenance(args.authors_repo)
    result["runs"], result["ratios"] = {}, {}
    for vocab in vocabs:
        runs = {}
        for which in sides:
            r = run_child(which, child_argv, vocab, args.malloc_mmap_threshold)
            steps = r["step_s"]
            runs[which] = {
                "run_s": r["run_s"], "samples_per_s": args.batch * args.steps / r["run_s"],
                "step_s_mean": sum(steps) / len(steps) if steps else None, "step_s_min": min(steps) if steps else None,
                "peak_rss_mb": r["peak_rss_mb"], "rss_start_mb": r["rss_start_mb"],
                "peak_rss_above_start_mb": r["peak_rss_mb"] - r["rss_start_mb"], "step_s": steps,
                "load_avg_1m_after": os.getloadavg()[0],
            }
            print(f"V={vocab} {which}: {runs[which]['samples_per_s']:.2f} samples/s over the whole run, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB ({runs[which]['peak_rss_above_start_mb']:.0f} MB above the start)", flush=True)
        result["runs"][str(vocab)], result["ratios"][str(vocab)] = runs, ratios_of(runs)
    if len(vocabs) > 1:
        first, last = result["runs"][str(vocabs[0])], result["runs"][str(vocabs[-1])]
        result["vocab_growth_mb"] = {  # peak above the start: what training adds, the larger model excluded
            s: last[s]["peak_rss_above_start_mb"] - first[s]["peak_rss_above_start_mb"] for s in sides}
    result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for vocab, rat in result["ratios"].items():
        for k, v in rat.items():
            print(f"V={vocab} {k}: {v['samples_per_s']:.2f}× the samples/s, {v['peak_rss']:.2f}× the peak RSS "
                  f"({v['peak_rss_above_start']:.2f}× above the start)")
    for k, v in result.get("vocab_growth_mb", {}).items():
        print(f"{k}: training's peak grows by {v:.0f} MB from V={vocabs[0]} to V={vocabs[-1]}")
    print(f"→ {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
