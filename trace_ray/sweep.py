"""Comparing methods fairly, the one way the demo (SynthShift) and the real-model benchmark do it.

Every method runs through the same trainer with the same settings; only its learning rate is
chosen, from the same grid for every method, by the same score on a **validation** split (first
seed); then every seed runs at the picked rate and the held-out numbers of those runs are the
result. Runs are Ray tasks (1 CPU each, ``parallel`` at a time), so two runs share a 2-core machine.

- ``run_jobs(fn, jobs, parallel, desc)``: ``fn(job) -> result dict`` for every job, ``parallel`` at a
  time, results in the jobs' order; a tqdm bar shows each finished run;
- ``pick_learning_rates(results, score)``: per method, the search run with the best validation
  score (a tie goes to the smaller rate) and the score of every rate tried;
- ``method_runs(...)``: the report's ``methods`` dict (``trace_ray.report``): per method its picked
  rate, the scores of the search and one entry per seed with the held-out metrics.

A job and a result are plain dicts with at least ``method``, ``lr`` and ``seed``; the result also
has ``metrics`` (``{split: metrics}``), and what the report shows (``curves``, ``weights``,
``sample``, ``train_s``).
"""

from __future__ import annotations

from typing import Callable


def run_jobs(fn: Callable[[dict], dict], jobs: list[dict], parallel: int = 2, desc: str = "runs") -> list[dict]:
    """Run ``fn`` on every job as Ray tasks (1 CPU each), at most ``parallel`` at a time."""
    import ray
    from tqdm.auto import tqdm

    task = ray.remote(num_cpus=1)(fn)
    pending: dict = {}
    results: dict[int, dict] = {}
    queue = list(enumerate(jobs))
    bar = tqdm(total=len(jobs), desc=desc, unit="run")
    while queue or pending:
        while queue and len(pending) < parallel:
            i, j = queue.pop(0)
            pending[task.remote(j)] = (i, j)
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i, j = pending.pop(ref)
            r = ray.get(ref)
            results[i] = r
            bar.set_postfix_str(f"{j['method']} lr={j['lr']:g} s={j['seed']} ({r.get('total_s', 0):.0f} s)")
            bar.update(1)
    bar.close()
    return [results[i] for i in range(len(jobs))]


def pick_learning_rates(results: list[dict], score: Callable[[dict], float]) -> tuple[dict, dict]:
    """``(picked, scores)``: per method the result with the highest ``score`` (ties → the smaller
    learning rate), and ``{method: {str(lr): score}}`` of every rate tried."""
    picked: dict[str, dict] = {}
    scores: dict[str, dict] = {}
    for r in results:
        scores.setdefault(r["method"], {})[str(r["lr"])] = score(r)
    for m in scores:
        cands = [r for r in results if r["method"] == m]
        picked[m] = max(cands, key=lambda r: (score(r), -r["lr"]))
    return picked, scores


def method_runs(methods: list[str], picked: dict, scores: dict, finals: list[dict], split: str,
                keys: tuple[str, ...] = ("curves", "weights", "train_s")) -> dict:
    """The report's ``methods`` dict: per method ``lr``, ``lr_search``, ``sample`` and ``runs`` (one
    per seed, sorted, with ``metrics`` = the ``split`` metrics of that run)."""
    out = {}
    for m in methods:
        runs = sorted((r for r in finals if r["method"] == m), key=lambda r: r["seed"])
        out[m] = {
            "lr": picked[m]["lr"], "lr_search": scores[m],
            "sample": next((r["sample"] for r in runs if r.get("sample")), picked[m].get("sample")),
            "runs": [{"seed": r["seed"], "lr": r["lr"], "metrics": r["metrics"][split],
                      **{k: r[k] for k in keys if k in r}} for r in runs],
        }
    return out
