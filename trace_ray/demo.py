"""``trace-ray demo``: the whole TRACE story on SynthShift, on a local Ray, on a laptop CPU.

world → reference (cached) → triage (Ray Data, the SynthShift policy YAML) → four methods through
the shared trainer (``trace_ray.train.train_local``, one in-process worker per run, runs spread
over Ray tasks) → evaluation → ``report.json`` / ``report.html`` / PNGs.

Fairness: every method has the same steps, batch, seeds, loss constants (β, α_KL, NLL anchor λ, retain NLL μ)
and the same learning-rate grid; its learning rate is picked by a score on the **validation**
split (``tpa_sampled_fluent − collateral``), never on the test prompts. Test metrics are reported
for the picked learning rate only, mean ± std over seeds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trace_ray.config import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "synthshift"
# name → (config file, label)
METHODS = {
    "naive_dpo": "naive_dpo.yaml",
    "npo_all": "npo_all.yaml",
    "trace_uniform": "trace_uniform.yaml",
    "trace": "trace.yaml",
}


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    quick: bool = False
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    lrs: list[float] = field(default_factory=lambda: [7e-4, 1e-3])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_steps: int = 150
    num_samples: int = 4  # sampled generations per held-out prompt
    temperature: float = 1.0
    eval_stride: int = 1  # evaluate every k-th held-out prompt (quick runs)
    parallel: int = 2  # concurrent training runs (Ray tasks, 1 CPU and 1 torch thread each)
    extra_overrides: list[str] = field(default_factory=list)  # key=value for every RunConfig

    def validate(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"methods: unknown {bad[0]!r}; valid: {', '.join(METHODS)}")
        if not self.lrs or not self.seeds or self.max_steps < 1:
            raise ConfigError("lrs, seeds: need at least one; max_steps: >= 1")


def quick_config(out: str) -> DemoConfig:
    """The ``--quick`` demo (tests): one learning rate, one seed, few steps, a smaller reference."""
    return DemoConfig(out=out, quick=True, lrs=[3e-3], seeds=[0], max_steps=8, num_samples=2, eval_stride=3)


# ----------------------------------------------------------------------------- one run (a Ray task)
def run_one(job: dict) -> dict:
    """Train one (method, lr, seed) with ``train_local`` and evaluate it on ``job["splits"]``."""
    import torch

    torch.set_num_threads(1)
    from trace_ray.data.synthshift import WorldConfig, build_world
    from trace_ray.evaluate import evaluate_model, load_for_eval, policy_oracle
    from trace_ray.policy import load_policy
    from trace_ray.train import train_local
    from trace_ray.train.config import load_run_config

    t0 = time.time()
    cfg = load_run_config(job["config"], job["overrides"])
    res = train_local(cfg, progress=False, save=False)
    t_train = time.time() - t0
    model, tok = res["model"], res["tokenizer"]
    model = getattr(model, "module", model).eval()
    ref, _ = load_for_eval(job["reference"])
    world = build_world(WorldConfig(**job["world"]))
    oracle = policy_oracle(load_policy(job["policy"]))
    out = {k: job[k] for k in ("method", "lr", "seed")}
    out["metrics"] = {}
    for split in job["splits"]:
        m = evaluate_model(model, tok, world, oracle=oracle, ref_model=ref, ref_summary=job["ref_summary"][split],
                           split=split, num_samples=job["num_samples"], temperature=job["temperature"],
                           seed=job["seed"], with_rows=split == "test",
                           stride=job.get("stride", 1))
        rows = m.pop("rows", None)
        if rows:
            shifted = [r for r in rows if r["shifted"]]
            out["sample"] = {k: shifted[0][k] for k in ("prompt", "greedy", "sampled")}
        out["metrics"][split] = m
    out["curves"] = res["metrics"]
    out["weights"] = sorted(float(w) for _, w in (res.get("weights") or {}).values())
    out["train_s"] = round(t_train, 1)
    out["total_s"] = round(time.time() - t0, 1)
    if not job.get("keep_outputs"):
        shutil.rmtree(job["run_dir"], ignore_errors=True)
    return out


def val_score(m: dict) -> float:
    """Selection score on the validation split (same for every method)."""
    return m["tpa_sampled_fluent"] - m.get("collateral", 0.0)


# ----------------------------------------------------------------------------- the pipeline
def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; returns the report's results dict (also written to ``OUT/report/``)."""
    cfg.validate()
    t_start = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    from trace_ray.data.synthshift import POLICY_PATH, WorldConfig, build_world, write_world
    from trace_ray.evaluate import REF_KEYS, evaluate_model, load_for_eval, policy_oracle
    from trace_ray.models.reference import QUICK_RECIPE, ReferenceRecipe, get_reference
    from trace_ray.policy import load_policy
    from trace_ray.report import write_report
    from trace_ray.triage import run_triage

    policy = load_policy(POLICY_PATH)  # validated before any work
    world_cfg = WorldConfig()
    world = build_world(world_cfg)
    paths = write_world(world, out / "world")
    print(f"[demo] world: {json.dumps(world.stats()['train'])} → {out / 'world'}", flush=True)

    recipe = QUICK_RECIPE if cfg.quick else ReferenceRecipe()
    t0 = time.time()
    ref_dir = get_reference(recipe)
    link = out / "reference"
    if link.is_symlink() or link.exists():
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    link.symlink_to(ref_dir, target_is_directory=True)
    print(f"[demo] reference model: {ref_dir} ({time.time() - t0:.0f} s)", flush=True)

    from trace_ray.ray_utils import ensure_ray

    ensure_ray()

    summary = run_triage(paths["train"], policy, out / "triage")
    triaged = str(out / "triage" / "triaged.parquet")
    print(f"[demo] triage: {summary['counts']}", flush=True)

    ref_model, tok = load_for_eval(ref_dir)
    oracle = policy_oracle(policy)
    ref_summary = {}
    ref_metrics = {}
    for split in ("val", "test"):
        m = evaluate_model(ref_model, tok, world, oracle=oracle, ref_model=None, split=split,
                           num_samples=cfg.num_samples, temperature=cfg.temperature, seed=0,
                           stride=cfg.eval_stride)
        ref_summary[split] = {k: m[k] for k in REF_KEYS}
        ref_metrics[split] = m
    ref_metrics["test"].update(collateral=0.0, refusal_rise=0.0, kl_to_ref=0.0)
    print(f"[demo] reference on test: TPA sampled {ref_metrics['test']['tpa_sampled']:.3f}, "
          f"detail rate (unshifted) {ref_metrics['test']['detail_rate_unshifted']:.3f}", flush=True)

    def job(method, lr, seed, splits):
        run_dir = out / "runs" / f"{method}_lr{lr:g}_s{seed}"
        return {
            "method": method, "lr": lr, "seed": seed, "splits": splits, "run_dir": str(run_dir),
            "config": str(CONFIG_DIR / METHODS[method]),
            "overrides": [f"data.triaged={triaged}", f"model.name={ref_dir}", f"output.dir={run_dir}",
                          f"optim.lr={lr}", f"train.seed={seed}", f"train.max_steps={cfg.max_steps}",
                          "logging.progress=false", *cfg.extra_overrides],
            "reference": str(ref_dir), "policy": str(POLICY_PATH), "world": asdict(world_cfg),
            "ref_summary": ref_summary, "num_samples": cfg.num_samples, "stride": cfg.eval_stride, "temperature": cfg.temperature,
        }

    from trace_ray.sweep import method_runs, pick_learning_rates, run_jobs

    # 1. learning rate per method on the validation split (first seed); test metrics are computed
    #    in the same run but only used for the picked lr.
    seed0 = cfg.seeds[0]
    search = run_jobs(run_one, [job(m, lr, seed0, ["val", "test"]) for m in cfg.methods for lr in cfg.lrs],
                      cfg.parallel, "lr search (val)" if len(cfg.lrs) > 1 else "runs")
    picked, lr_search = pick_learning_rates(search, lambda r: val_score(r["metrics"]["val"]))
    # 2. the other seeds at the picked lr
    rest = run_jobs(run_one, [job(m, picked[m]["lr"], s, ["test"]) for m in cfg.methods for s in cfg.seeds[1:]],
                    cfg.parallel, "seeds (test)") if len(cfg.seeds) > 1 else []
    methods = method_runs(cfg.methods, picked, lr_search, [picked[m] for m in cfg.methods] + rest, "test")
    results = {
        "title": "trace-ray demo: SynthShift" + (" (quick)" if cfg.quick else ""),
        "config": {"demo": asdict(cfg), "reference_recipe": asdict(recipe), "world": asdict(world_cfg),
                   "policy": policy.fingerprint},
        "triage": {k: summary[k] for k in ("total", "counts")},
        "world": world.stats(),
        "reference": ref_metrics["test"],
        "methods": methods,
    }
    results["runtime_s"] = time.time() - t_start
    paths = write_report(results, out / "report")
    print("\n" + results["table_markdown"], flush=True)
    print(f"\n[demo] done in {results['runtime_s']:.0f} s → {paths['html']}", flush=True)
    return results
