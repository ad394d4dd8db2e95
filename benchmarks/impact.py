"""Benchmark: alignment-impact scores — the TRACE authors' per-sample loop vs our batched ``jvp`` / ``fd``.

Same tiny LLaMA (≈13.4M parameters with the real 50,257-token GPT-2 vocabulary), same real HH-RLHF
rows, fp32, LoRA (r=32 on q/v) and full parameters. Every (parameters, batch, method) cell runs in
its own fresh Python process (clean peak-memory figure), after a one-pair warm-up; all cells of one
invocation run back to back, so the ratios compare like with like. Scores are taken at θ = θ_ref,
in eval mode, as the authors do, on the authors' loss (NPO without 2/β, ``npo_normalize=False``).

Methods:
- ``authors`` — the baseline. With ``--authors-repo DIR`` (a checkout of respailab/TRACE, or the
  files ``src/utils/{losses,common,reward,datamodule}.py`` of one): THEIR code, imported and run
  as written — ``utils.losses._impact_invert`` / ``_impact_punish`` per pair: their tokenisation
  (``_tokenize_pair``: a chat template or "### Question/Answer", padded to 256 tokens), per pair 4
  no-grad forwards + 2 forward+backward passes to a flattened gradient (invert) or 2 × (reference
  forward + forward+backward) (punish), a separate frozen reference model. Its provenance (repo,
  commit, files, sha256) goes into the JSON. Without ``--authors-repo``: ``reimpl``'s loop.
- ``reimpl`` — the project's re-implementation of that loop with OUR tokenisation (the same token
  sequences ``jvp``/``fd`` score), so that agreement can be measured exactly.
- ``jvp`` / ``fd`` — ``trace_ray.impact.impact_scores`` on the whole batch. ``seconds``: with the
  reference log-probs given; ``seconds_with_ref``: plus a separate reference pass (one batched
  no-grad forward, adapter disabled); ``seconds_fused``: ``at_reference=True`` — at θ = θ_ref the
  reference log-probs are the policy's own, taken from the scoring pass itself (no extra pass).

The headline ratio is ``authors`` seconds / ``seconds_fused`` (the authors' loop contains its own
reference forwards). Agreement (max relative error, Pearson r) is against ``reimpl`` (same tokens);
against ``authors``' code it is reported too, but their tokenisation differs, so it is approximate.

Run (CPU; ~25 min on 2 shared cores):
    .venv/bin/python benchmarks/impact.py --authors-repo /path/to/TRACE --out benchmarks/results/impact_cpu.json
Quick look:
    .venv/bin/python benchmarks/impact.py --batches 8 --params lora --out /tmp/impact.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import HH, ROOT, TOKENIZER, hh_pairs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(HH), help="HH-RLHF jsonl(.gz) file (real rows; default: the shared one)")
    p.add_argument("--tokenizer", default=str(TOKENIZER), help="HF tokenizer folder (default: shared GPT-2 tokenizer, 50,257 tokens)")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="batch sizes (pairs) to score")
    p.add_argument("--params", nargs="+", default=["lora", "full"], choices=["lora", "full"], help="trainable parameters")
    p.add_argument("--methods", nargs="+", default=["authors", "reimpl", "jvp", "fd"],
                   choices=["authors", "reimpl", "exact", "jvp", "fd"],
                   help="methods to time; 'authors' is the speed baseline, 'reimpl' the agreement baseline")
    p.add_argument("--authors-repo", default=None,
                   help="a checkout of respailab/TRACE (or its src/utils files): the 'authors' baseline runs "
                        "their code; without it, 'authors' is the project's re-implementation")
    p.add_argument("--hidden", type=int, default=128, help="model hidden size")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--intermediate", type=int, default=512, help="MLP intermediate size")
    p.add_argument("--lora-r", type=int, default=32, help="LoRA rank (q_proj, v_proj)")
    p.add_argument("--max-length", type=int, default=256, help="max tokens per prompt+response")
    p.add_argument("--gold-size", type=int, default=32, help="gold batch size for g_J")
    p.add_argument("--beta", type=float, default=0.3, help="DPO/NPO β")
    p.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "impact_cpu.json"), help="JSON output path")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one cell, JSON spec
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- shared set-up
def load_records(path: str, n: int, tokenizer: str, max_length: int) -> list[dict]:
    """The first ``n`` well-formed HH rows whose prompt and longer response fit in ``max_length``
    tokens with room to spare (nothing truncated in either tokenisation; the authors'
    ``_tokenize_pair`` fails on a prompt longer than its 256 tokens). Scoring rows alternate
    invert/punish (the categories only decide which loss is scored: this is about cost and
    agreement, not triage)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    out = []
    for r in hh_pairs(path, 20 * n):
        n_tok = len(tok(r["prompt"])["input_ids"]) + max(len(tok(r[s])["input_ids"]) for s in ("chosen", "rejected"))
        if n_tok <= max_length - 24:
            out.append({k: r[k] for k in ("id", "prompt", "chosen", "rejected")})
            if len(out) == n:
                break
    return out


def build(args, params: str):
    """(tokenizer, model, reference copy) — seeded, so every process builds the same ones."""
    import copy

    import torch
    from transformers import AutoTokenizer

    from trace_ray.models.tiny import build_tiny_llama

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = build_tiny_llama(tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                             intermediate_size=args.intermediate, seed=0)
    ref = copy.deepcopy(model).requires_grad_(False)
    if params == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules=["q_proj", "v_proj"]))
    model.to(args.device).eval()
    return tok, model, ref.to(args.device).eval()


def scoring_records(args, max_batch: int):
    recs = load_records(args.data, max_batch + 3 * args.gold_size, args.tokenizer, args.max_length)
    score = recs[:max_batch]
    for i, r in enumerate(score):
        r["category"] = ("invert", "punish")[i % 2]
    gold_src = recs[max_batch:]
    for i, r in enumerate(gold_src):
        r["category"] = ("retain", "invert", "punish")[i % 3]
    return score, gold_src


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, else RSS sampled every 2 ms."""

    def __init__(self, device: str):
        self.device, self.peak_mb, self._stop = device, 0.0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._rss()
            self._max = self._base

            def sample():
                while not self._stop.wait(0.002):
                    self._max = max(self._max, self._rss())

            self._t = threading.Thread(target=sample, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            self._t.join()
            self._max = max(self._max, self._rss())
            self.peak_mb = (self._max - self._base) / 2**20
        return False


# ----------------------------------------------------------------------------- the baseline
def authors_scores(model, ref, tok, records, g_J, beta, device, max_length):
    """The authors' scorer (see module docstring); returns a list of floats. Each response is
    tokenised exactly as in ``encode_pairs`` (same prompt cut), then run alone, unpadded."""
    import torch
    import torch.nn.functional as F

    from trace_ray.logprobs import encode_pairs

    params = [p for p in model.parameters() if p.requires_grad]
    g_flat = torch.cat([g.reshape(-1) for g in g_J]).to(device)

    def rows(rec):
        b = encode_pairs(tok, [rec], max_length)
        out = []
        for n in range(2):
            keep = b["attention_mask"][n].bool()
            ids = b["input_ids"][n][keep][None].to(device)
            labels = torch.where(b["loss_mask"][n][keep].bool(), b["input_ids"][n][keep], -100)[None].to(device)
            out.append((ids, labels))
        return out

    def logp(m, ids, labels):  # full logits, full-vocab log_softmax (HF/_get_batch_logps style)
        logits = m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()[:, :-1]
        lab = labels[:, 1:]
        mask = lab != -100
        lp = torch.log_softmax(logits, -1).gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (lp * mask).sum(-1)

    def flat_grad(loss):
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)])

    out = []
    for rec in records:
        pw, pl = rows(rec)  # y_w = chosen, y_l = rejected
        if rec["category"] == "invert":  # reversed DPO: y_l preferred
            with torch.no_grad():
                lw_t, ll_t = logp(model, *pw), logp(model, *pl)
                lw_r, ll_r = logp(ref, *pw), logp(ref, *pl)
            delta = (ll_t - ll_r) - (lw_t - lw_r)
            c = float(-torch.sigmoid(-beta * delta) * beta)
            g_l = flat_grad(logp(model, *pl).sum())
            g_w = flat_grad(logp(model, *pw).sum())
            gL = c * (g_l - g_w)
        else:  # punish: dual NPO, authors' form (no 2/β)
            gL = 0
            for pair in (pw, pl):
                with torch.no_grad():
                    lr = logp(ref, *pair)
                loss = -F.logsigmoid(-beta * (logp(model, *pair) - lr)).mean()
                gL = gL + flat_grad(loss)
        out.append(float(torch.dot(g_flat, gL)))
    return out


# ----------------------------------------------------------------------------- one cell
def authors_code_scores(repo: str, model, ref, tok, records, g_J, beta, device) -> list[float]:
    """The authors' own scoring functions (``src/utils/losses.py`` of respailab/TRACE), imported
    from ``repo`` and called as their ``compute_impact_scores`` calls them, one pair at a time.
    Their invert rows are pre-swapped (chosen = the compliant y_l); ours are not, so swap here."""
    import torch

    sys.path.insert(0, str(Path(repo) / "src"))
    from utils.losses import _impact_invert, _impact_punish  # noqa: E402 - their module

    gJ = torch.cat([g.reshape(-1) for g in g_J]).to(device)
    dev = torch.device(device)
    out = []
    for r in records:
        if r["category"] == "invert":
            out.append(_impact_invert({"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]},
                                      model, ref, tok, gJ, beta, dev))
        else:
            out.append(_impact_punish({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]},
                                      model, ref, tok, gJ, beta, dev))
    return out


def authors_provenance(repo: str) -> dict:
    """What was run as the authors' code: repo, commit, files and their sha256."""
    import hashlib

    root = Path(repo)
    files = {f: hashlib.sha256((root / f).read_bytes()).hexdigest()
             for f in ("src/utils/losses.py", "src/utils/common.py", "src/utils/reward.py", "src/utils/datamodule.py")
             if (root / f).exists()}
    info = {"dir": str(root), "files_sha256": files}
    if (root / ".git").exists():
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        info.update({"repo": "respailab/TRACE", "commit": head.stdout.strip()})
    if (root / "PROVENANCE.json").exists():
        info.update(json.loads((root / "PROVENANCE.json").read_text()))
    return info


def run_cell(args, spec: dict) -> dict:
    import torch

    from trace_ray.impact import build_score_batch, impact_scores
    from trace_ray.logprobs import reference_logps

    tok, model, ref = build(args, spec["params"])
    score_recs, _ = scoring_records(args, max(args.batches))
    recs = score_recs[: spec["batch"]]
    g_J = [g.to(args.device) for g in torch.load(spec["g_path"])]
    method = spec["method"]

    def ours(rs, fused: bool):
        """(scores, seconds scoring only, seconds tokenising + reference pass + scoring)."""
        t0 = time.perf_counter()
        batch = build_score_batch(tok, rs, args.max_length)
        if not fused:  # LoRA: adapter disabled; full: the frozen copy (at θ_ref both equal θ)
            batch["ref_logps"] = reference_logps(model if spec["params"] == "lora" else ref, batch)
        t1 = time.perf_counter()
        s = impact_scores(model, batch, g_J, method, beta=args.beta, npo_normalize=False, at_reference=fused)
        sync(args.device)
        t2 = time.perf_counter()
        return s.tolist(), t2 - t1, t2 - t0

    def loop(rs):
        t0 = time.perf_counter()
        if method == "authors" and args.authors_repo:
            s = authors_code_scores(args.authors_repo, model, ref, tok, rs, g_J, args.beta, args.device)
        else:
            s = authors_scores(model, ref, tok, rs, g_J, args.beta, args.device, args.max_length)
        sync(args.device)
        return s, time.perf_counter() - t0

    out = dict(spec)
    if method in ("authors", "reimpl"):
        loop(recs[:2])  # warm-up: one invert + one punish pair
        with PeakMemory(args.device) as mem:
            scores, secs = loop(recs)
        out.update(seconds=secs, seconds_with_ref=secs, seconds_fused=secs, peak_mem_mb=mem.peak_mb, scores=scores,
                   code="authors' own (--authors-repo)" if method == "authors" and args.authors_repo
                   else "project re-implementation")
        return out
    ours(recs[:2], False), ours(recs[:2], True)  # warm-up
    with PeakMemory(args.device) as mem:
        scores, secs, secs_ref = ours(recs, False)
    with PeakMemory(args.device) as mem_f:
        scores_f, _, secs_f = ours(recs, True)
    out.update(seconds=secs, seconds_with_ref=secs_ref, seconds_fused=secs_f, peak_mem_mb=mem.peak_mb,
               peak_mem_fused_mb=mem_f.peak_mb, scores=scores, scores_fused=scores_f)
    return out


def sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_gJ(args, params: str, path: str) -> dict:
    import torch

    from trace_ray.impact import build_gold_batch, global_gradient
    from trace_ray.logprobs import encode_pairs, reference_logps

    tok, model, ref = build(args, params)
    _, gold_src = scoring_records(args, max(args.batches))
    gold = build_gold_batch(gold_src, args.gold_size, seed=0)
    t0 = time.perf_counter()
    batches = []
    for s in range(0, len(gold), 8):
        b = encode_pairs(tok, gold[s : s + 8], args.max_length)
        b["ref_logps"] = reference_logps(model if params == "lora" else ref, b)
        batches.append(b)
    g = global_gradient(model, batches)
    secs = time.perf_counter() - t0
    torch.save([x.cpu() for x in g], path)
    n_all = sum(p.numel() for p in model.parameters())
    n_tr = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": params, "g_J_seconds": secs, "gold_pairs": len(gold), "total_params": n_all,
            "trainable_params": n_tr, "g_J_norm": float(torch.sqrt(sum((x.double() ** 2).sum() for x in g)))}


# ----------------------------------------------------------------------------- orchestration
def subprocess_json(args, spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)] + passthrough(args)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"cell {spec} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def passthrough(args) -> list[str]:
    return ["--data", args.data, "--tokenizer", args.tokenizer, "--batches", *map(str, args.batches),
            "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads),
            "--intermediate", str(args.intermediate), "--lora-r", str(args.lora_r),
            "--max-length", str(args.max_length), "--gold-size", str(args.gold_size),
            "--beta", str(args.beta), "--device", args.device] + (
                ["--authors-repo", args.authors_repo] if args.authors_repo else [])


def agreement(a: list[float], s: list[float]) -> dict:
    import torch

    a_t, s_t = torch.tensor(a, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    rel = float((s_t - a_t).abs().max() / a_t.abs().max().clamp_min(1e-30))
    r = float(torch.corrcoef(torch.stack([a_t, s_t]))[0, 1]) if len(a) > 1 else float("nan")
    return {"max_rel_err": rel, "pearson_r": r}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        import torch

        torch.manual_seed(0)
        out = make_gJ(args, spec["params"], spec["g_path"]) if spec.get("kind") == "gJ" else run_cell(args, spec)
        print(json.dumps(out))
        return 0

    from tqdm import tqdm

    started = time.time()
    load0 = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="impact_bench_")
    cells, models = [], {}
    todo = [(p, b, m) for p in args.params for b in args.batches for m in args.methods]
    bar = tqdm(total=len(args.params) + len(todo), desc="impact benchmark")
    for p in args.params:
        g_path = os.path.join(tmp, f"g_{p}.pt")
        models[p] = subprocess_json(args, {"kind": "gJ", "params": p, "g_path": g_path})
        bar.update()
        for b in args.batches:
            row = {}
            for m in args.methods:
                row[m] = subprocess_json(args, {"params": p, "batch": b, "method": m, "g_path": g_path})
                bar.update()
            base, same = row.get("authors"), row.get("reimpl")
            for m, c in row.items():
                if base and m != "authors":
                    for k in ("seconds", "seconds_with_ref", "seconds_fused"):
                        c[k.replace("seconds", "speedup")] = base["seconds"] / c[k]
                    c["peak_mem_ratio"] = c["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] > 0 else None
                if m not in ("authors", "reimpl"):
                    if same:
                        c["agreement_vs_reimpl"] = agreement(same["scores"], c["scores"])
                        c["agreement_fused_vs_reimpl"] = agreement(same["scores"], c["scores_fused"])
                    if base and base.get("code", "").startswith("authors' own"):
                        c["agreement_fused_vs_authors_code"] = agreement(base["scores"], c["scores_fused"])
                c["seconds_per_pair"] = c["seconds_fused"] / b
                cells.append(c)
    bar.close()
    import torch

    result = {
        "benchmark": "impact scores: TRACE authors' per-sample loop vs jvp / fd",
        "command": "python benchmarks/impact.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "device": args.device,
                    "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                    "note": "2 CPU cores shared with other jobs at the time; ratios are within one run"},
        "models": models,
        "authors_code": authors_provenance(args.authors_repo) if args.authors_repo else
        "not given: 'authors' is the project's re-implementation of their loop (our tokenisation)",
        "cells": [{k: v for k, v in c.items() if k not in ("g_path",)} for c in cells],
        "wall_seconds": time.time() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {args.out}")
    return 0


def table(result: dict) -> str:
    lines = ["| params | batch | method | s (ref given) | s (+ref pass) | s (fused ref) | speed-up fused | "
             "speed-up +ref | peak MB | r vs reimpl | r vs authors' code |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        f = lambda k, fmt: (fmt.format(c[k]) if c.get(k) is not None else "—")  # noqa: E731
        r = lambda k: "{:.6f}".format(c[k]["pearson_r"]) if c.get(k) else "—"  # noqa: E731
        lines.append(f"| {c['params']} | {c['batch']} | {c['method']} | {c['seconds']:.2f} | {c['seconds_with_ref']:.2f} | "
                     f"{c['seconds_fused']:.2f} | {f('speedup_fused', '{:.2f}×')} | {f('speedup_with_ref', '{:.2f}×')} | "
                     f"{c['peak_mem_mb']:.0f} | {r('agreement_fused_vs_reimpl')} | {r('agreement_fused_vs_authors_code')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
