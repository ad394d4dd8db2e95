"""The real-model benchmark: a real instruct model re-aligned on real preference pairs under a new
policy, TRACE against the baselines, measured on held-out prompts (``benchmarks/realign_real.py``).

data (conversations → their last user turn) → triage on Ray Data with held-out and validation
splits → the reference's answers on both splits (once) → every method through the shared trainer
(``train_local``, as Ray tasks two at a time: ``trace_ray.sweep``) with its learning rate picked on
the validation split, then every seed at that rate evaluated on the held-out split
(``trace_ray.evaluate_pairs``) → ``report.json`` / ``report.html`` / PNGs, the answers of the
reference and of every method side by side on a handful of held-out prompts, and one chat
completion of the TRACE adapter through the Serve app.

Fairness (as the demo's): every method has the same trainer, steps, batch, sequence length, loss
constants (β, α_KL, the NLL anchor λ, the retain NLL μ) and the same learning-rate grid, picked by
the same validation score (``val_score``); the held-out prompts are never trained on and never
used to pick anything (the split is by a hash of the prompt).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trace_ray.config import ConfigError, deep_merge

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "real" / "smollm2_hh_voice.yaml"
# What each compared method is, as overrides of the shared run config (the demo's four configs
# under configs/synthshift/ differ from each other by exactly these fields).
METHODS: dict[str, dict] = {
    "naive_dpo": {"method": "naive_dpo", "impact": {"weights": "uniform"}},
    "npo_all": {"method": "npo_all", "impact": {"weights": "uniform"}},
    "trace_uniform": {"method": "trace", "impact": {"weights": "uniform"}},
    "trace": {"method": "trace", "impact": {"weights": "impact"}},
}


@dataclass
class EvalSettings:
    """Keyword arguments of ``evaluate_pairs`` (one set for every model, the reference included)."""

    max_prompts: int = 64  # per set: conflict prompts (TPA), retain prompts (over-refusal)
    num_samples: int = 2
    temperature: float = 0.7
    max_new_tokens: int = 80
    batch_size: int = 16
    max_length: int = 192
    dtype: str = "bfloat16"
    num_examples: int = 8  # greedy answers kept per set (the report's side-by-side samples)
    limit: int | None = None  # rows read from the split
    max_scored: int | None = None  # rows scored per set for utility, KL, preference accuracy (None: all read)


@dataclass
class RealBenchConfig:
    """One benchmark run; ``configs/real/smollm2_hh_voice.yaml`` holds the full one."""

    name: str = "realign-real"
    data: str = ""  # preference data (any format triage reads)
    format: str = "auto"
    last_turn: bool = True  # reduce each conversation to its last user turn (short sequences)
    policy: str = ""  # the new policy (a text policy: it judges generated answers)
    holdout: float = 0.1
    validation: float = 0.05
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    lrs: list[float] = field(default_factory=lambda: [2e-3, 3e-3])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    parallel: int = 2  # concurrent runs (Ray tasks, 1 CPU and 1 torch thread each)
    realign: dict[str, Any] = field(default_factory=dict)  # the shared RunConfig (trace_ray.train.config)
    validation_eval: EvalSettings = field(default_factory=EvalSettings)  # picks the learning rate
    heldout_eval: EvalSettings = field(default_factory=EvalSettings)  # the reported numbers
    samples: int = 6  # held-out prompts whose answers the report shows side by side
    serve_check: bool = True  # one chat completion of the TRACE adapter through the Serve app
    serve_prompt: str = "What should I do if I find a lost wallet on the street?"

    def validate(self):
        for name in ("data", "policy"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required field is missing")
        if not Path(self.policy).exists():
            raise ConfigError(f"policy: file {self.policy} does not exist (a policy YAML, e.g. configs/policies/hh_voice_brevity.yaml)")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"methods: unknown {bad[0]!r}; valid: {', '.join(METHODS)}")
        if not self.methods or not self.lrs or not self.seeds:
            raise ConfigError("methods, lrs, seeds: need at least one each")
        if not 0 < self.holdout < 1 or not 0 < self.validation < 1:
            raise ConfigError("holdout, validation: fractions in (0, 1) (the benchmark needs both splits)")
        if self.parallel < 1:
            raise ConfigError(f"parallel: must be >= 1, got {self.parallel}")
        for split in ("validation_eval", "heldout_eval"):
            ev = getattr(self, split)
            for k in ("max_prompts", "num_samples", "max_new_tokens", "batch_size", "max_length", "limit", "max_scored"):
                v = getattr(ev, k)
                if v is not None and v < 1:
                    raise ConfigError(f"{split}.{k}: must be a positive integer, got {v}")


def load_bench_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RealBenchConfig:
    from trace_ray.config import load_config

    return load_config(RealBenchConfig, path or CONFIG, overrides)


def quick_overrides() -> list[str]:
    """``--quick`` (the test suite, a few minutes): every stage, the smallest sizes that still run it."""
    return ["methods=[trace]", "lrs=[2.0e-3]", "seeds=[0]", "realign.train.max_steps=2",
            "realign.train.batch_size=4", "realign.data.limit=24", "realign.impact.gold_size=4",
            "realign.data.max_length=96", "samples=2",
            *[f"{s}.{k}" for s in ("validation_eval", "heldout_eval")
              for k in ("max_prompts=2", "num_samples=1", "max_new_tokens=8", "max_length=96", "limit=24")]]


def val_score(m: dict) -> float:
    """Selection score on the validation split, the same for every method: sampled TPA, minus the
    rise of refusals on retain prompts over the reference's, minus the relative rise of the utility
    NLL (a broken or refusing model does not win by breaking the policy's rules less)."""
    over = max(0.0, m.get("over_refusal") or 0.0)
    u, ref = m.get("utility_nll"), (m.get("utility") or {}).get("reference_nll_per_token")
    nll_rise = max(0.0, u / ref - 1.0) if u and ref else 0.0
    return (m.get("tpa_sampled") or 0.0) - over - nll_rise


# ----------------------------------------------------------------------------- one run (a Ray task)
def run_one(job: dict) -> dict:
    """Train one (method, lr, seed) — or load its saved adapter — and evaluate it on ``job["splits"]``."""
    import torch

    torch.set_num_threads(1)
    from trace_ray.evaluate_pairs import evaluate_pairs

    t0 = time.time()
    out = {k: job[k] for k in ("method", "lr", "seed")}
    run_dir = Path(job["run_dir"])
    if job.get("train", True):
        from trace_ray.config import from_dict
        from trace_ray.train import train_local
        from trace_ray.train.config import RunConfig

        res = train_local(from_dict(RunConfig, job["run"]), progress=False, save=True)
        model, tok = res["model"], res["tokenizer"]
        out["curves"] = res["metrics"]
        out["weights"] = sorted(float(w) for _, w in (res.get("weights") or {}).values())
        out["train_s"] = round(time.time() - t0, 1)
    else:  # a search run's adapter, evaluated on the held-out split once its lr is picked
        from trace_ray.models.load import load_model, load_tokenizer

        adapter = str(run_dir / "adapter")
        model, tok = load_model(adapter, dtype=job["eval"]["validation"]["dtype"]), load_tokenizer(adapter)
        out.update(job["carry"])
    model = getattr(model, "module", model).eval()
    out["metrics"] = {}
    out["eval_s"] = {}
    for split in job["splits"]:
        t1 = time.time()
        m = evaluate_pairs(model, job["data"][split], str(run_dir / f"eval_{split}"), job["policy"], tokenizer=tok,
                           reference_answers=job["reference_answers"][split], show_progress=False,
                           **job["eval"][split])
        out["metrics"][split] = m
        out["eval_s"][split] = round(time.time() - t1, 1)
    out["total_s"] = round(time.time() - t0, 1)
    return out


def reference_one(job: dict) -> dict:
    """The reference model itself on one split; writes its answers for every later comparison."""
    import torch

    torch.set_num_threads(1)
    from trace_ray.evaluate_pairs import evaluate_pairs

    t0 = time.time()
    m = evaluate_pairs(job["model"], job["data"], job["out"], job["policy"], reference_answers=job["reference_answers"],
                       show_progress=False, **job["eval"])
    return {"method": "reference", "lr": 0.0, "seed": 0, "split": job["split"], "metrics": m,
            "total_s": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------- the benchmark
def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return []


def run_benchmark(cfg: RealBenchConfig, out: str | Path, *, quick: bool = False, results_path: str | Path | None = None,
                  report_dir: str | Path | None = None) -> dict:
    """Run the benchmark into ``out``; returns the results dict (also ``OUT/report/report.json``,
    and a copy at ``results_path`` / the report in ``report_dir`` when given)."""
    cfg.validate()
    t_start = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from trace_ray.data.prepare import write_last_turn_pairs
    from trace_ray.policy import load_policy
    from trace_ray.ray_utils import ensure_ray
    from trace_ray.sweep import method_runs, pick_learning_rates, run_jobs
    from trace_ray.train.config import RunConfig
    from trace_ray.config import from_dict
    from trace_ray.triage import run_triage

    policy = load_policy(cfg.policy)  # validated before any work
    base_run = from_dict(RunConfig, deep_merge(cfg.realign, {"data": {"triaged": "x"}, "output": {"dir": "x"}}))
    timings: dict[str, float] = {}
    loads: list[dict] = [{"at_s": 0.0, "load": _load()}]

    def mark(name: str, t: float) -> None:
        timings[name] = round(time.time() - t, 1)
        loads.append({"at_s": round(time.time() - t_start, 1), "after": name, "load": _load()})
        print(f"[realign-real] {name}: {timings[name]:.0f} s (load {loads[-1]['load']})", flush=True)

    # 1. data and triage (Ray Data), with the held-out and validation splits
    t = time.time()
    data = cfg.data
    prep = None
    if cfg.last_turn:
        prep = write_last_turn_pairs(cfg.data, out / "data" / "last_turn.jsonl", cfg.format)
        data = prep["out"]
    ensure_ray(num_cpus=max(2, cfg.parallel))
    summary = run_triage(data, policy, out / "triage", format="pairs" if cfg.last_turn else cfg.format,
                         holdout=cfg.holdout, validation=cfg.validation, show_progress=False)
    mark("data + triage", t)
    splits = {"validation": str(out / "triage" / "validation.parquet"), "heldout": str(out / "triage" / "heldout.parquet")}
    evals = {"validation": asdict(cfg.validation_eval), "heldout": asdict(cfg.heldout_eval)}
    answers = {s: str(out / "reference" / f"answers_{s}.json") for s in splits}

    # 2. the reference on both splits (its answers are reused by every comparison)
    t = time.time()
    ref = run_jobs(reference_one, [
        {"method": "reference", "lr": 0.0, "seed": 0, "split": s, "model": base_run.model.name, "data": splits[s],
         "out": str(out / "reference" / s), "policy": str(Path(cfg.policy).resolve()), "eval": evals[s],
         "reference_answers": answers[s]} for s in splits], cfg.parallel, "reference")
    ref_metrics = {r["split"]: r["metrics"] for r in ref}
    mark("reference answers", t)

    def job(method: str, lr: float, seed: int, splits_: list[str], train: bool = True, carry: dict | None = None) -> dict:
        run_dir = out / "runs" / f"{method}_lr{lr:g}_s{seed}"
        run = deep_merge(cfg.realign, METHODS[method])
        run = deep_merge(run, {"data": {"triaged": str(out / "triage" / "triaged.parquet")},
                               "output": {"dir": str(run_dir)}, "optim": {"lr": lr}, "train": {"seed": seed},
                               "logging": {"progress": False}})
        return {"method": method, "lr": lr, "seed": seed, "splits": splits_, "run_dir": str(run_dir), "run": run,
                "train": train, "carry": carry or {}, "data": splits, "eval": evals, "policy": str(Path(cfg.policy).resolve()),
                "reference_answers": answers}

    # 3. learning rate per method on the validation split (first seed). With one rate there is
    #    nothing to pick: the search run is evaluated on the held-out split too (no reload).
    t = time.time()
    seed0 = cfg.seeds[0]
    one_lr = len(cfg.lrs) == 1
    search = run_jobs(run_one, [job(m, lr, seed0, ["validation"] + ["heldout"] * one_lr)
                                for m in cfg.methods for lr in cfg.lrs], cfg.parallel, "lr search (validation)")
    picked, lr_search = pick_learning_rates(search, lambda r: val_score(r["metrics"]["validation"]))
    mark("learning-rate search", t)

    # 4. every seed at the picked lr on the held-out split (the first seed's adapter is reused)
    t = time.time()
    final_jobs = [job(m, picked[m]["lr"], s, ["heldout"]) for m in cfg.methods for s in cfg.seeds[1:]]
    if not one_lr:
        final_jobs += [job(m, picked[m]["lr"], seed0, ["heldout"], train=False,
                           carry={k: picked[m][k] for k in ("curves", "weights", "train_s")}) for m in cfg.methods]
    finals = run_jobs(run_one, final_jobs, cfg.parallel, "seeds (held-out)") if final_jobs else []
    finals += [picked[m] for m in cfg.methods] if one_lr else []
    mark("held-out runs", t)
    for r in finals:
        r["sample"] = None
    methods = method_runs(cfg.methods, picked, lr_search, finals, "heldout")

    serve = None
    if cfg.serve_check:
        t = time.time()
        shown = "trace" if "trace" in cfg.methods else cfg.methods[0]  # the TRACE adapter when it ran
        serve = _serve_check(out / "runs" / f"{shown}_lr{picked[shown]['lr']:g}_s{seed0}" / "adapter",
                             cfg.policy, cfg.serve_prompt)
        mark("serve check", t)

    reference = dict(ref_metrics["heldout"])
    reference.update(over_refusal=0.0, kl_to_ref=0.0, **violation_share(ref_metrics["heldout"]))
    results = {
        "title": f"trace-ray real benchmark: {cfg.name}" + (" (quick)" if quick else ""),
        "note": ("Held-out prompts (never trained on, never used to pick a learning rate); mean ± std over seeds; "
                 "each method's learning rate picked on the validation split from the same grid."),
        "config": {"benchmark": asdict(cfg), "policy": policy.fingerprint, "quick": quick},
        "data": {"prepared": prep, "triage": {k: summary[k] for k in ("total", "counts", "splits", "rule_hits")}},
        "triage": {k: summary[k] for k in ("total", "counts")},
        "reference": reference,
        "reference_validation": ref_metrics["validation"],
        "methods": methods,
        "selection": {"score": val_score.__doc__.split(":")[0].strip(), "validation": {
            m: {str(r["lr"]): _headline(r["metrics"]["validation"]) for r in search if r["method"] == m} for m in cfg.methods}},
        "side_by_side": side_by_side(ref_metrics["heldout"], finals, cfg.methods, seed0, cfg.samples),
        "serve_check": serve,
        "timing": {"stages_s": timings, "runs": [_run_timing(r) for r in search + (finals if not one_lr else finals[:-len(cfg.methods)])]},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": loads},
    }
    results["runtime_s"] = round(time.time() - t_start, 1)
    from trace_ray.report import write_report

    paths = write_report(results, out / "report")
    print("\n" + results["table_markdown"], flush=True)
    if report_dir:
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        for p in paths.values():
            shutil.copy2(p, report_dir / Path(p).name)
    if results_path:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        Path(results_path).write_text(json.dumps(results, indent=1, default=float))
    print(f"\n[realign-real] done in {results['runtime_s']:.0f} s → {paths['html']}", flush=True)
    return results


HEADLINE = ("tpa_sampled", "tpa_greedy", "over_refusal", "refusal_rate", "utility_nll", "kl_to_ref", "pref_accuracy")


def _headline(m: dict) -> dict:
    return {k: m.get(k) for k in HEADLINE} | {"score": val_score(m)}


def violation_share(m: dict) -> dict:
    """The share of a model's answers on every evaluated prompt (conflict and retain) that break
    the policy: ``violation_greedy`` / ``violation_sampled`` (what there is to re-align)."""
    tpa = m.get("tpa") or {}
    n_c, n_r = tpa.get("prompts") or 0, (m.get("refusal") or {}).get("prompts") or 0
    out = {}
    for k in ("greedy", "sampled"):
        c, r = tpa.get(k), (tpa.get("on_retain_prompts") or {}).get(k)
        out[f"violation_{k}"] = (1 - ((c or 0) * n_c + (r or 0) * n_r) / (n_c + n_r)
                                 if n_c + n_r and c is not None and (r is not None or not n_r) else None)
    return out


def _run_timing(r: dict) -> dict:
    return {k: r.get(k) for k in ("method", "lr", "seed", "train_s", "eval_s", "total_s")}


def side_by_side(ref: dict, finals: list[dict], methods: list[str], seed: int, n: int) -> list[dict]:
    """The reference's and each method's greedy answer (seed ``seed``) on the first ``n`` held-out
    conflict prompts and the first ``n // 2`` retain prompts, with the oracle's verdict."""
    by_method = {r["method"]: {g["prompt"]: g for g in r["metrics"]["heldout"].get("generations", [])}
                 for r in finals if r["seed"] == seed}
    rows = []
    gens = ref.get("generations", [])
    picks = [g for g in gens if g["category"] == "conflict"][:n] + [g for g in gens if g["category"] == "retain"][: n // 2]
    for g in picks:
        row = {"prompt": g["prompt"], "set": g["category"],
               "answers": {"reference": {"text": g["greedy"], "verdict": g["verdict"], "refusal": g["refusal"]}}}
        for m in methods:
            mg = by_method.get(m, {}).get(g["prompt"])
            if mg:
                row["answers"][m] = {"text": mg["greedy"], "verdict": mg["verdict"], "refusal": mg["refusal"]}
        rows.append(row)
    return rows


def _serve_check(adapter: Path, policy: str, prompt: str) -> dict:
    """One chat completion of ``adapter`` through the Serve app on this Ray (``trace_ray.serve_check``)."""
    from trace_ray.serve_check import chat_once

    return chat_once(str(adapter), policy=str(Path(policy).resolve()), prompt=prompt, max_tokens=32,
                     settings={"hf": {"num_cpus": 0.25}})
