"""Evaluation of a re-aligned model on triaged *real* pairs (PKU-SafeRLHF, HH-RLHF, ...).

``trace_ray.evaluate`` measures SynthShift, where every answer's compliance is known. On real
data the triaged Parquet is what we know, so this module asks whether training moved the model's
own log-probabilities the way the triage says, against the reference (the base with the LoRA
adapter disabled, or a given reference model). With Δ(y) = logp_θ(y|x) − logp_ref(y|x) summed over
response tokens (the implicit reward of DESIGN §1, without β):

- ``invert.pref_new`` — share of invert pairs where the model now prefers y_l (the compliant side):
  logp_θ(y_l) > logp_θ(y_w); ``invert.margin_shift`` — mean of Δ(y_l) − Δ(y_w) (> 0 = toward the
  new policy); ``invert.pref_new_ref`` is the same share for the reference.
- ``punish.delta`` — mean Δ over both responses of punish pairs (< 0 = both pushed down).
- ``retain.delta`` — mean Δ(y_w) on retain pairs (≈ 0 = kept); ``retain.kl_to_ref`` — mean
  token-level KL(ref ‖ θ) on y_w (Eq. of L_KL in DESIGN §1).
- ``generations`` — greedy answers to the first prompts, with the policy's verdict where its rules
  can judge free text (metadata rules cannot: generated text has no PKU labels).

Tensor shapes follow ``trace_ray.evaluate.response_scores``: one score per (prompt, response).
"""

from __future__ import annotations

import json
from pathlib import Path


class _AdapterDisabled:
    """Calls a peft model with its adapter disabled: the reference, without a second copy."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **kwargs):
        with self.model.disable_adapter():
            return self.model(**kwargs)


def _mean(xs) -> float | None:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else None


def evaluate_pairs(model: str, triaged: str, out_dir: str, policy: str | None = None, *,
                   reference: str | None = None, limit: int | None = None, max_length: int = 256,
                   batch_size: int = 8, num_generations: int = 4, max_new_tokens: int = 48) -> dict:
    """Metrics of the module docstring for ``model`` (adapter or model folder) on ``triaged``.

    ``reference``: a model spec for full fine-tunes (adapters use their disabled base). Writes
    ``out_dir/metrics.json`` and returns the same dict.
    """
    import torch

    from trace_ray.evaluate import generate, response_scores
    from trace_ray.models.load import load_model, load_tokenizer
    from trace_ray.triage_output import read_triaged

    torch.manual_seed(0)
    rows = read_triaged(triaged).to_pylist()[: limit or None]
    tok = load_tokenizer(model)
    m = load_model(model)
    if hasattr(m, "disable_adapter"):
        ref = _AdapterDisabled(m)
    elif reference:
        ref = load_model(reference)
    else:
        ref = None

    def scores(which, prompts, responses, kl=False):
        if not prompts:
            return {"logp": [], "ntok": [], "kl": []}
        net = m if which == "model" else ref
        return response_scores(net, tok, prompts, responses, ref_model=ref if kl else None,
                               batch_size=batch_size, max_length=max_length)

    by_cat = {c: [r for r in rows if r["category"] == c] for c in ("invert", "punish", "retain", "unresolved")}
    out: dict = {"model": model, "rows": len(rows), "counts": {c: len(v) for c, v in by_cat.items()},
                 "reference": "adapter_disabled" if hasattr(m, "disable_adapter") else (reference or None)}

    inv = by_cat["invert"]
    if inv:
        P = [r["prompt"] for r in inv]
        w, l = scores("model", P, [r["chosen"] for r in inv]), scores("model", P, [r["rejected"] for r in inv])
        out["invert"] = {"pref_new": _mean(b > a for a, b in zip(w["logp"], l["logp"]))}
        if ref is not None:
            wr, lr = scores("ref", P, [r["chosen"] for r in inv]), scores("ref", P, [r["rejected"] for r in inv])
            out["invert"]["pref_new_ref"] = _mean(b > a for a, b in zip(wr["logp"], lr["logp"]))
            out["invert"]["margin_shift"] = _mean(
                (lm - lrf) - (wm - wrf) for wm, lm, wrf, lrf in zip(w["logp"], l["logp"], wr["logp"], lr["logp"]))
    pun = by_cat["punish"]
    if pun and ref is not None:
        P = [r["prompt"] for r in pun] * 2
        Y = [r["chosen"] for r in pun] + [r["rejected"] for r in pun]
        out["punish"] = {"delta": _mean(a - b for a, b in zip(scores("model", P, Y)["logp"], scores("ref", P, Y)["logp"]))}
    ret = by_cat["retain"]
    if ret and ref is not None:
        P, Y = [r["prompt"] for r in ret], [r["chosen"] for r in ret]
        s = scores("model", P, Y, kl=True)
        out["retain"] = {"delta": _mean(a - b for a, b in zip(s["logp"], scores("ref", P, Y)["logp"])),
                         "kl_to_ref": _mean(s.get("kl", [])),
                         "nll_per_token": sum(-x for x in s["logp"]) / max(1, sum(s["ntok"]))}

    gen_rows = rows[:num_generations]
    if gen_rows:
        prompts = [r["prompt"] for r in gen_rows]
        answers = [a[0] for a in generate(m, tok, prompts, do_sample=False, max_new_tokens=max_new_tokens,
                                          batch_size=batch_size)]
        verdicts = [None] * len(answers)
        if policy:
            from trace_ray.policy import load_policy

            pol = load_policy(policy)
            verdicts = [v.verdict for v in pol.check(prompts, answers, [{} for _ in prompts])]
        out["generations"] = [{"prompt": p, "answer": a, "verdict": v, "category": r["category"]}
                              for p, a, v, r in zip(prompts, answers, verdicts, gen_rows)]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "metrics.json").write_text(json.dumps(out, indent=2, default=float))
    return out
