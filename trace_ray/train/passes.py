"""The two passes before training: reference log-probs (Ray Data) and impact weights (workers).

``ReferenceLogps`` is a Ray Data ``map_batches`` class UDF (an actor pool holds the model once):
it adds ``ref_chosen_logps``, ``ref_rejected_logps`` and ``ref_corrected_logps`` (NaN where a row
has no y_c) to every row, like TRL's ``precompute_ref_log_probs``. ``train_local`` calls the same
class on pandas batches in-process.

``impact_pass`` runs on the training workers at θ = θ_ref with the training backend's process
group: each worker takes its share of the gold batch (rows ``rank::world``), ``g_J`` is the
all-reduced pair-weighted mean of their gradients (= the gradient of J over the whole gold batch,
whatever the number of workers), each worker scores its own shard (``impact.impact_scores``), and
the normalisation (clamp at 0, then L1 or mean-1 over D_I ∪ D_II) uses all-reduced sums, so the
weights equal ``impact.normalize_weights`` over all scores at once.
"""

from __future__ import annotations

import math

import torch

from trace_ray.train.config import RunConfig


class ReferenceLogps:
    """``map_batches`` UDF: pandas batch → the same batch plus the reference log-prob columns."""

    def __init__(self, model_spec: str, dtype: str, attn_implementation: str, max_length: int):
        from trace_ray.models.load import load_model, load_tokenizer

        self.tok = load_tokenizer(model_spec)
        self.model = load_model(model_spec, dtype=dtype, attn_implementation=attn_implementation)
        self.model.requires_grad_(False).eval()
        self.max_length = max_length

    def __call__(self, df):
        from trace_ray.logprobs import encode_pairs, sequence_logps

        recs = df.to_dict("records")
        n = len(recs)
        with_c = "corrected" in df.columns and any(bool(r.get("corrected")) for r in recs)
        with torch.no_grad():
            lp = sequence_logps(self.model, encode_pairs(self.tok, recs, self.max_length, with_corrected=with_c)) if n else torch.zeros(0)
        df = df.copy()
        df["ref_chosen_logps"] = lp[:n].double().numpy() if n else []
        df["ref_rejected_logps"] = lp[n : 2 * n].double().numpy() if n else []
        corr = lp[2 * n :].double().numpy() if with_c else [math.nan] * n
        df["ref_corrected_logps"] = [
            float(c) if (with_c and r.get("corrected")) else math.nan for c, r in zip(corr, recs)
        ]
        return df


def impact_pass(cfg: RunConfig, model, tok, rows: list[dict], gold: list[dict], env, ref_model=None,
                at_reference: bool = False) -> dict:
    """``{row: (id, weight)}`` for this worker's invert/punish rows, keyed by ``row["_row"]`` (the
    row's position in the training rows; see module docstring). ``at_reference``: the model is
    still θ_ref (the pass before the first step), so the reference log-probs are the policy's own,
    taken from the passes that score it (``impact_scores(at_reference=True)``) instead of a
    reference forward of their own; a refresh during training (θ ≠ θ_ref) runs that forward."""
    from trace_ray.impact import dpo_objective, global_gradient, impact_scores
    from trace_ray.logprobs import encode_pairs
    from trace_ray.losses import category_codes
    from trace_ray.logprobs import reference_logps
    from trace_ray.train.step import _reference_logps

    ic, mode = cfg.impact, cfg.reference.mode
    fused = at_reference and mode != "precomputed"  # precomputed: the columns are already there
    # fd's fused reference (the mean of its θ±εĝ log-probs) is exact to O(ε²) only: runs compared
    # number for number (ZeRO-3 against in-process) then drift by ~2e-4 in L_I, so fd scores
    # against a reference forward; g_J's reference (the policy's own forward) is exact for all.
    fused_scores = fused and ic.method != "fd"
    bs, L = ic.batch_size, cfg.data.max_length
    params = [p for p in model.parameters() if p.requires_grad]

    def ref_of(batch):
        if ref_model is not None:
            return _reference_logps(model, ref_model, batch, "frozen_copy")
        return reference_logps(model, batch)  # adapter disabled; a full fine-tune at θ = θ_ref: θ itself

    # g_J: this worker's slice of the gold batch, summed over workers with pair counts.
    mine = gold[env.rank :: env.world]
    batches = []
    for s in range(0, len(mine), bs):
        b = encode_pairs(tok, mine[s : s + bs], L)
        if not fused:
            b["ref_logps"] = ref_of(b)
        batches.append(b)
    n_local = sum(b["input_ids"].shape[0] // 2 for b in batches)
    if batches:
        g_local = global_gradient(model, batches, J=dpo_objective(cfg.loss.beta, at_reference=fused))
    else:
        g_local = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    dev = g_local[0].device
    flat = torch.cat([g.reshape(-1) * n_local for g in g_local] + [torch.tensor([float(n_local)], device=dev)])
    env.all_reduce(flat)
    n_total = float(flat[-1])
    if n_total == 0:
        raise ValueError("impact: the gold batch is empty (no retain/invert/punish rows to build J from)")
    g_J, off = [], 0
    for p in params:
        g_J.append((flat[off : off + p.numel()] / n_total).view_as(p).float())
        off += p.numel()

    # Scores of this worker's preference rows, in batches.
    pref = [r for r in rows if r["category"] in ("invert", "punish")]
    scores = torch.zeros(len(pref), dtype=torch.float64)
    for s in range(0, len(pref), bs):
        chunk = pref[s : s + bs]
        with_c = any(r.get("corrected") for r in chunk)
        b = encode_pairs(tok, chunk, L, with_corrected=with_c)
        b["category"] = category_codes([r["category"] for r in chunk])
        if mode == "precomputed":
            keys = ["ref_chosen_logps", "ref_rejected_logps"] + (["ref_corrected_logps"] if with_c else [])
            b["ref_logps"] = torch.tensor(
                [0.0 if r.get(k) is None or math.isnan(r[k]) else float(r[k]) for k in keys for r in chunk], dtype=torch.float32
            )
        elif not fused_scores:
            b["ref_logps"] = ref_of(b)
        # Punish rows are scored on NPO without 2/β whatever loss.npo_normalize says: a weight must
        # not grow with a constant factor of the loss it multiplies, else 2/β counts twice
        # ((2/β)² ≈ 44 at β = 0.3 against invert rows). docs/method.md, "Punish-row balance".
        scores[s : s + len(chunk)] = impact_scores(
            model, b, g_J, ic.method, beta=cfg.loss.beta, npo_normalize=False, nll_lambda=cfg.loss.nll_anchor,
            at_reference=fused_scores,
        ).double()

    # Global normalisation (= impact.normalize_weights over every worker's scores at once).
    w = (scores / ic.gamma).clamp_min(0.0)
    tot = torch.tensor([float(w.sum()), float(len(pref))], dtype=torch.float64)
    env.all_reduce(tot)
    total, n = float(tot[0]), float(tot[1])
    if n and total <= 0:  # no positive score anywhere: uniform weights (plain TRACE)
        w, total = torch.ones_like(w), n
    if n:
        w = w / total * (n if ic.normalize == "mean" else 1.0)
    return {r["_row"]: (r["id"], float(x)) for r, x in zip(pref, w)}
