"""``report.json`` + ``report.html`` + PNG plots from a demo's (or any evaluation's) results.

Input (``results`` dict; every part optional except ``methods``)::

    {"title": str, "runtime_s": float, "config": {...},
     "triage": {"total": N, "counts": {"invert": a, "punish": b, "retain": c, "unresolved": d}},
     "reference": {metric: value, ...},
     "methods": {name: {"runs": [{"seed": s, "lr": x, "metrics": {...},
                                  "curves": [metrics.jsonl rows], "weights": [w_i, ...]}, ...],
                        "lr": picked lr, "lr_search": {lr: val score}, "sample": {...}}}}

``aggregate`` adds, per method, ``mean`` and ``std`` of every scalar metric over its runs. A real
run (``trace_ray.report_run.collect_run``) adds ``run`` (weights by category, the highest- and
lowest-weighted samples, the nested metrics) and ``note`` (what the metrics were measured on);
its extra plots and sections come from ``trace_ray.report_run``.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from trace_ray.plots import histograms, pyplot

HEADLINE = [
    ("tpa_sampled", "TPA sampled ↑"),
    ("tpa_greedy", "TPA greedy ↑"),
    ("tpa_sampled_fluent", "TPA sampled & well-formed ↑"),
    ("p_compliant_style_shifted", "P(compliant style | shifted) ↑"),
    ("collateral", "collateral ↓"),
    ("collateral_any_detail", "collateral, any step marker ↓"),
    ("refusal_rise", "refusal rise ↓"),
    ("refusal_rate", "refusal rate, retain prompts ↓"),
    ("over_refusal", "over-refusal vs reference ↓"),
    ("well_formed", "well-formed ↑"),
    ("utility_nll", "utility NLL ↓"),
    ("kl_to_ref", "KL to ref ↓"),
    ("pref_accuracy", "pref. accuracy ↑"),
]


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def aggregate(results: dict) -> dict:
    """Per method: ``mean`` / ``std`` (population, over seeds) of every scalar metric."""
    for m in results.get("methods", {}).values():
        runs = [r for r in m.get("runs", []) if r.get("metrics")]
        keys = sorted(set().union(*[_scalars(r["metrics"]) for r in runs])) if runs else []
        mean, std = {}, {}
        for k in keys:
            xs = [_scalars(r["metrics"])[k] for r in runs if k in _scalars(r["metrics"])]
            xs = [x for x in xs if not math.isnan(x)]
            if not xs:
                continue
            mu = sum(xs) / len(xs)
            mean[k] = mu
            std[k] = math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))
        m["mean"], m["std"], m["n_seeds"] = mean, std, len(runs)
    return results


def markdown_table(results: dict) -> str:
    """Methods × headline metrics as a Markdown table (mean ± std over seeds)."""
    cols = [(k, n) for k, n in HEADLINE if any(k in m.get("mean", {}) for m in results["methods"].values())]
    lines = ["| method | " + " | ".join(n for _, n in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    ref = results.get("reference")
    if ref:
        lines.append("| reference | " + " | ".join(_fmt(ref.get(k)) for k, _ in cols) + " |")
    for name, m in results["methods"].items():
        cells = [_fmt(m["mean"].get(k), m["std"].get(k) if m.get("n_seeds", 1) > 1 else None) for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v, s=None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f} ± {s:.3f}" if s is not None else f"{v:.3f}"


# ----------------------------------------------------------------------------- plots
def plot_triage(results: dict, path: Path) -> Path | None:
    tri = results.get("triage")
    if not tri:
        return None
    plt = pyplot()
    counts = tri["counts"]
    names = ["invert", "punish", "retain", "unresolved"]
    fig, ax = plt.subplots(figsize=(5, 3))
    bars = ax.bar(names, [counts.get(n, 0) for n in names], color=["#d62728", "#9467bd", "#2ca02c", "#7f7f7f"])
    ax.bar_label(bars)
    ax.set_title(f"Triage of {tri.get('total', sum(counts.values()))} pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_weights(results: dict, path: Path) -> Path | None:
    series = {n: w for n, m in results["methods"].items() for r in m.get("runs", [])[:1] if (w := r.get("weights"))}
    return histograms(series, path, "weight w_i (invert + punish pairs)", "Alignment-impact weights")


LOSS_PARTS = ("loss", "L_I", "L_II", "L_KL", "L_anchor", "L_retain_nll")


def plot_losses(results: dict, path: Path) -> Path | None:
    """One panel per method (its first seed): the optimised loss and each part, per logged step."""
    methods = {n: m["runs"][0]["curves"] for n, m in results["methods"].items() if m.get("runs") and m["runs"][0].get("curves")}
    if not methods:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3), squeeze=False)
    for ax, (name, rows) in zip(axes[0], methods.items()):
        for k in LOSS_PARTS:  # the total and each part that this method has (None where absent)
            pts = [(r.get("step", i), r[k]) for i, r in enumerate(rows) if isinstance(r.get(k), (int, float)) and r[k] > 0]
            if pts:
                ax.plot(*zip(*pts), label=k, color=f"C{LOSS_PARTS.index(k)}")  # same colour per part
        ax.set_yscale("log")  # L_II (NPO, scaled by 2/β) and L_KL differ by orders of magnitude
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


TRADEOFF_X = {  # the damage each kind of evaluation measures: SynthShift's collateral, real data's over-refusal
    "collateral": ("collateral damage (unshifted topics) ↓", "Target-policy agreement vs collateral damage"),
    "over_refusal": ("over-refusal vs the reference (retain prompts) ↓", "Target-policy agreement vs over-refusal"),
}


def tradeoff_key(results: dict) -> str | None:
    return next((k for k in TRADEOFF_X if any(k in m.get("mean", {}) for m in results["methods"].values())), None)


def plot_tradeoff(results: dict, path: Path) -> Path | None:
    """Sampled TPA against the damage the evaluation measures (``TRADEOFF_X``), one point per method."""
    key = tradeoff_key(results)
    pts = {n: m for n, m in results["methods"].items() if "tpa_sampled" in m.get("mean", {}) and key in m["mean"]}
    if not pts:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, m in pts.items():
        ax.errorbar(m["mean"][key], m["mean"]["tpa_sampled"], xerr=m["std"].get(key, 0),
                    yerr=m["std"].get("tpa_sampled", 0), fmt="o", capsize=3, label=name)
    ref = results.get("reference")
    if ref and "tpa_sampled" in ref:
        ax.plot([0], [ref["tpa_sampled"]], "k*", label="reference")
    ax.set_xlabel(TRADEOFF_X[key][0])
    ax.set_ylabel("TPA sampled ↑")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(TRADEOFF_X[key][1])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- writers
def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, the PNGs and ``report.html`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    aggregate(results)
    plots = {
        "triage": plot_triage(results, out / "triage.png"),
        "weights": plot_weights(results, out / "weights.png"),
        "losses": plot_losses(results, out / "losses.png"),
        "tradeoff": plot_tradeoff(results, out / f"tpa_vs_{tradeoff_key(results) or 'collateral'}.png"),
    }
    if results.get("run"):
        from trace_ray.report_run import run_plots

        plots.update(run_plots(results, out))
    results["plots"] = {k: p.name for k, p in plots.items() if p}
    results["table_markdown"] = markdown_table(results)
    paths = {"json": out / "report.json", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(results, indent=2, default=float))
    paths["html"].write_text(render_html(results))
    paths.update({k: p for k, p in plots.items() if p})
    return paths


DEMO_NOTE = ("Metrics on held-out test prompts (unseen objects and phrasings); mean ± std over seeds; "
             "learning rate picked per method on the validation split.")


def side_by_side_html(rows: list[dict]) -> str:
    """Held-out prompts with the reference's and each method's greedy answer (and the oracle's
    verdict) side by side: ``[{"prompt", "set", "answers": {name: {"text", "verdict", "refusal"}}}]``."""
    if not rows:
        return ""
    from trace_ray.chat import last_user_turn

    e = html.escape
    names = list(dict.fromkeys(n for r in rows for n in r["answers"]))
    head = "".join(f"<th>{e(n)}</th>" for n in names)
    body = []
    for r in rows:
        cells = []
        for n in names:
            a = r["answers"].get(n)
            cells.append(f"<td><code>{e(a['text'])}</code><br><i>{e(a['verdict'])}{', refusal' if a.get('refusal') else ''}</i></td>"
                         if a else "<td>–</td>")
        body.append(f"<tr><td>{e(r.get('set', ''))}</td><td>{e(last_user_turn(r['prompt']))}</td>{''.join(cells)}</tr>")
    return ("<h2>Answers side by side on held-out prompts (greedy, first seed)</h2><table><tr><th>set</th><th>prompt</th>"
            f"{head}</tr>{''.join(body)}</table>")


def render_html(results: dict) -> str:
    e = html.escape
    cols = [(k, n) for k, n in HEADLINE if any(k in m.get("mean", {}) for m in results["methods"].values())]
    head = "".join(f"<th>{e(n)}</th>" for _, n in cols)
    rows = []
    ref = results.get("reference")
    if ref:
        rows.append("<tr><td><i>reference</i></td>" + "".join(f"<td>{_fmt(ref.get(k))}</td>" for k, _ in cols) + "<td></td></tr>")
    for name, m in results["methods"].items():
        cells = "".join(f"<td>{_fmt(m['mean'].get(k), m['std'].get(k) if m.get('n_seeds', 1) > 1 else None)}</td>" for k, _ in cols)
        rows.append(f"<tr><td><b>{e(name)}</b></td>{cells}<td>{e(str(m.get('lr', '')))}</td></tr>")
    samples = []
    for name, m in results["methods"].items():
        s = m.get("sample")
        if s:
            samples.append(f"<tr><td>{e(name)}</td><td>{e(s.get('prompt', ''))}</td><td><code>{e(s.get('greedy', ''))}</code></td>"
                           f"<td><code>{e(' ‖ '.join(s.get('sampled', [])))}</code></td></tr>")
    tri = results.get("triage")
    tri_html = ""
    if tri:
        tri_html = "<p>Triage: " + ", ".join(f"{k} {v}" for k, v in tri["counts"].items()) + f" (total {tri.get('total')})</p>"
    imgs = "".join(f'<figure><img src="{e(f)}" alt="{e(k)}"><figcaption>{e(k)}</figcaption></figure>'
                   for k, f in results.get("plots", {}).items())
    per_topic = ""
    for name, m in results["methods"].items():
        run = (m.get("runs") or [{}])[0]
        pt = run.get("metrics", {}).get("per_topic")
        if pt:
            cells = "".join(f"<td>{e(t)}{'*' if v['shifted'] else ''}<br>{v.get('tpa_sampled', v.get('detail_rate')):.2f}</td>"
                            for t, v in pt.items())
            per_topic += f"<tr><td>{e(name)}</td>{cells}</tr>"
    run_html = ""
    if results.get("run"):
        from trace_ray.report_run import run_sections

        run_html = run_sections(results)
    run_time = f"Run time: {results['runtime_s']:.0f} s. " if results.get("runtime_s") else ""
    per_topic_html = (f"<h2>Per topic (first seed; * = shifted: sampled TPA, else detailed share)</h2><table>{per_topic}</table>"
                      if per_topic else "")
    samples_html = ("<h2>One generation per method on a shifted prompt</h2><table><tr><th>method</th><th>prompt</th>"
                    f"<th>greedy</th><th>sampled</th></tr>{''.join(samples)}</table>" if samples else "")
    samples_html += side_by_side_html(results.get("side_by_side") or [])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(results.get('title', 'trace-ray report'))}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}}figure{{display:inline-block;margin:6px}}code{{font-size:12px}}</style></head><body>
<h1>{e(results.get('title', 'trace-ray report'))}</h1>
<p>{run_time}{e(results.get('note', DEMO_NOTE))}</p>
{tri_html}
<h2>Methods × metrics</h2><table><tr><th>method</th>{head}<th>lr</th></tr>{''.join(rows)}</table>
<h2>Plots</h2>{imgs}
{run_html}
{per_topic_html}
{samples_html}
<h2>Config</h2><pre>{e(json.dumps(results.get('config', {}), indent=1, default=str))}</pre>
</body></html>"""
