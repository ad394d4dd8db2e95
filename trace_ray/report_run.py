"""The report of a real run (``trace-ray report --pipeline OUT`` or ``--run REALIGN_DIR``): the same
``report.html`` as the demo's, from a run's files.

``collect_run`` reads what the stages wrote — the triage ``summary.json`` (counts, per-rule hits,
splits), the realign folder (``metrics.jsonl``: loss parts, reward margin and accuracy, gradient
norm, learning rate per logged step; ``weights.parquet``: the impact weight of every conflict row;
``run_config.yaml``: where its triaged table is) and the evaluation's ``metrics.json`` — into the
``results`` dict that ``trace_ray.report.write_report`` renders. ``run_plots`` / ``run_sections``
are the parts only a real run has: training curves, weights by category with the share of zero
weights, the ten highest- and lowest-weighted conflict samples with their text, per-rule hits,
and the nested metrics.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

TOP_K = 10
TRAIN_CURVES = (("margin", "reward margin (invert)"), ("reward_acc", "reward accuracy (invert)"),
                ("grad_norm", "gradient norm"), ("lr", "learning rate"))


def _read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def _triaged_path(realign_dir: Path, given: str | None) -> Path | None:
    if given:
        return Path(given)
    cfg = realign_dir / "run_config.yaml"
    if cfg.exists():
        import yaml

        p = (yaml.safe_load(cfg.read_text()) or {}).get("data", {}).get("triaged")
        if p and Path(p).exists():
            return Path(p)
    return None


def weight_tables(weights: dict[str, float], triaged: Path | None, k: int = TOP_K) -> tuple[dict, dict]:
    """``(by_category, samples)``: per category the weights' count, mean, min, max and share of
    exact zeros (clamped scores); the ``k`` highest- and lowest-weighted rows with their text."""
    from trace_ray.chat import transcript

    rows = {}
    if triaged is not None:
        import pyarrow.parquet as pq

        t = pq.read_table(triaged, columns=["id", "prompt", "chosen", "rejected", "category"])
        rows = {r["id"]: r for r in t.to_pylist() if r["id"] in weights}
    by_cat: dict[str, list[float]] = {}
    for rid, w in weights.items():
        by_cat.setdefault(rows.get(rid, {}).get("category", "unknown"), []).append(w)
    stats = {c: {"n": len(ws), "mean": sum(ws) / len(ws), "min": min(ws), "max": max(ws),
                 "zero_share": sum(w == 0 for w in ws) / len(ws), "weights": ws} for c, ws in sorted(by_cat.items())}
    order = sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))

    def sample(rid, w):
        r = rows.get(rid, {})
        prompt = transcript(r.get("prompt", ""))
        return {"id": rid, "weight": w, "category": r.get("category"),
                "prompt": prompt if len(prompt) <= 400 else "…" + prompt[-400:],
                "chosen": (r.get("chosen") or "")[:300], "rejected": (r.get("rejected") or "")[:300]}

    samples = {"top": [sample(*kv) for kv in order[:k]], "bottom": [sample(*kv) for kv in order[::-1][:k]]}
    return stats, samples


def collect_run(*, triage: str | None = None, realign: str | None = None, metrics: str | None = None,
                triaged: str | None = None, name: str = "trace", title: str | None = None) -> dict:
    """``results`` for ``write_report`` from a run's folders/files (each optional): ``triage`` (its
    folder or ``summary.json``), ``realign`` (its output folder), ``metrics`` (an evaluation's
    ``metrics.json``), ``triaged`` (the training table, when ``run_config.yaml`` does not say)."""
    results: dict = {"title": title or "trace-ray run", "run": {}, "methods": {}}
    if triage:
        p = Path(triage)
        summary = json.loads((p / "summary.json" if p.is_dir() else p).read_text())
        results["triage"] = summary
    run: dict = {}
    if realign:
        d = Path(realign)
        if not d.is_dir():
            raise FileNotFoundError(f"--run {d} is not a realign output folder")
        run["curves"] = _read_jsonl(d / "metrics.jsonl")
        if (d / "weights.parquet").exists():
            import pyarrow.parquet as pq

            t = pq.read_table(d / "weights.parquet").to_pydict()
            weights = dict(zip(t["id"], t["weight"]))
            by_cat, samples = weight_tables(weights, _triaged_path(d, triaged))
            results["run"]["weights_by_category"] = by_cat
            results["run"]["weighted_samples"] = samples
            run["weights"] = list(weights.values())
    if metrics:
        m = json.loads(Path(metrics).read_text())
        run["metrics"] = m
        results["run"]["metrics"] = m
        if m.get("reference_metrics"):
            results["reference"] = m["reference_metrics"]
        split = m.get("split")
        results["note"] = (f"Metrics on the {split} split ({m.get('rows')} rows of {m.get('data')}); "
                           + ("IN-SAMPLE (the training table): a diagnostic, not a result." if m.get("in_sample")
                              else "never trained on."))
    if run:
        results["methods"][name] = {"runs": [run]}
    return results


# ----------------------------------------------------------------------------- plots
def plot_training(results: dict, path: Path) -> Path | None:
    """Reward margin, reward accuracy, gradient norm and learning rate per logged step."""
    from trace_ray.plots import pyplot

    curves = {n: m["runs"][0]["curves"] for n, m in results["methods"].items() if m.get("runs") and m["runs"][0].get("curves")}
    keys = [(k, label) for k, label in TRAIN_CURVES
            if any(isinstance(r.get(k), (int, float)) for rows in curves.values() for r in rows)]
    if not keys:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, (k, label) in zip(axes[0], keys):
        for name, rows in curves.items():
            pts = [(r.get("step", i), r[k]) for i, r in enumerate(rows) if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_weights_by_category(results: dict, path: Path) -> Path | None:
    from trace_ray.plots import histograms

    by_cat = results.get("run", {}).get("weights_by_category") or {}
    series = {f"{c} (n={s['n']}, zero {100 * s['zero_share']:.0f}%)": s["weights"] for c, s in by_cat.items()}
    return histograms(series, path, "impact weight w_i", "Impact weights by category")


def run_plots(results: dict, out: Path) -> dict:
    return {"training": plot_training(results, out / "training.png"),
            "weights_by_category": plot_weights_by_category(results, out / "weights_by_category.png")}


# ----------------------------------------------------------------------------- HTML
def _flatten(d, prefix="") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        elif not isinstance(v, list):
            out.append((key, v))
    return out


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape("–" if v is None else str(v))


def run_sections(results: dict) -> str:
    """The HTML sections of a real run (empty for the demo)."""
    e = html.escape
    parts = []
    tri = results.get("triage") or {}
    if tri.get("rule_hits"):
        rows = "".join(f"<tr><td>{e(n)}</td><td>{h['chosen']}</td><td>{h['rejected']}</td></tr>"
                       for n, h in tri["rule_hits"].items())
        parts.append(f"<h2>Triage: per-rule hits</h2><table><tr><th>rule</th><th>chosen flagged</th>"
                     f"<th>rejected flagged</th></tr>{rows}</table>")
    if len(tri.get("splits", {})) > 1:
        parts.append("<p>Splits (by a hash of the prompt): " + ", ".join(
            f"{e(k)} {v['total']}" for k, v in tri["splits"].items()) + "</p>")
    run = results.get("run", {})
    if run.get("weights_by_category"):
        rows = "".join(f"<tr><td>{e(c)}</td><td>{s['n']}</td><td>{s['mean']:.3f}</td><td>{s['min']:.3f}</td>"
                       f"<td>{s['max']:.3f}</td><td>{100 * s['zero_share']:.1f}%</td></tr>"
                       for c, s in run["weights_by_category"].items())
        parts.append("<h2>Impact weights by category</h2><table><tr><th>category</th><th>n</th><th>mean</th>"
                     f"<th>min</th><th>max</th><th>zero weights</th></tr>{rows}</table>")
    for key, label in (("top", "highest"), ("bottom", "lowest")):
        samples = run.get("weighted_samples", {}).get(key)
        if samples:
            rows = "".join(f"<tr><td>{s['weight']:.4g}</td><td>{e(str(s['category']))}</td><td>{e(s['prompt'])}</td>"
                           f"<td>{e(s['chosen'])}</td><td>{e(s['rejected'])}</td></tr>" for s in samples)
            parts.append(f"<h2>The {len(samples)} {label}-weighted conflict samples</h2><table><tr><th>weight</th>"
                         f"<th>category</th><th>prompt</th><th>chosen</th><th>rejected</th></tr>{rows}</table>")
    m = run.get("metrics")
    if m:
        flat = [(k, v) for k, v in _flatten(m) if k not in ("refusal.detector",)]
        rows = "".join(f"<tr><td>{e(k)}</td><td>{_cell(v)}</td></tr>" for k, v in flat)
        parts.append(f"<h2>All metrics</h2><table>{rows}</table>")
        if m.get("refusal", {}).get("detector"):
            parts.append(f"<p>Refusal detector (first {m['refusal'].get('window_chars')} characters, any case): "
                         f"<code>{e(m['refusal']['detector'])}</code></p>")
        gens = m.get("generations") or []
        if gens:
            rows = "".join(f"<tr><td>{e(g['category'])}</td><td>{e(_tail(g['prompt']))}</td><td><code>{e(g['greedy'])}</code></td>"
                           f"<td>{e(str(g['verdict']))}</td><td><code>{e(g.get('reference_greedy') or '')}</code></td></tr>"
                           for g in gens)
            parts.append("<h2>Generations on held-out prompts (greedy)</h2><table><tr><th>set</th><th>prompt</th>"
                         f"<th>model</th><th>verdict</th><th>reference</th></tr>{rows}</table>")
    return "\n".join(parts)


def _tail(prompt: str, n: int = 300) -> str:
    from trace_ray.chat import transcript

    t = transcript(prompt)
    return t if len(t) <= n else "…" + t[-n:]
