"""One mixed training micro-batch → the TRACE loss and its parts (pure torch; no Ray here).

Shared by the Ray Train loop (``loop.py``) and the in-process ``train_local`` — one code path.

A micro-batch holds rows of every category together. The forward is split by what each row needs:

- preference rows (invert, punish): ``prompt+chosen``, ``prompt+rejected`` (and ``prompt+y_c``
  for punish rows with a correction) in ONE padded forward, label log-probs only (no full-vocab
  log-softmax: ``trace_ray.logprobs.sequence_logps``);
- retain rows: ``prompt+chosen`` only, for the token-level forward KL to the reference, computed
  from hidden states a chunk of positions at a time (``trace_ray.logprobs.kl_and_logps``: the
  ``[R, T, V]`` logits are never held); their rejected response carries no loss and is never run.

The reference comes from precomputed columns (``ref_chosen_logps`` …), the base with the LoRA
adapter disabled, or a frozen copy. Losses come from ``trace_ray.losses.trace_loss`` with
``reduction="sum"``; this module divides by the *nominal* micro-batch size B (rows given to a
worker per micro-step), so that averaging over accumulation steps and workers gives exactly the
global-batch value whatever the split: 2 workers × 1 step = 1 worker × 2 accumulation steps.

Methods (``RunConfig.method``) map onto the same losses:
``trace`` — invert → reversed DPO, punish → dual NPO (or DPO y_c ≻ y_w, y_c ≻ y_l), retain → KL;
``naive_dpo`` — every pair whose chosen is non-compliant (invert ∪ punish) → reversed DPO (the
false dichotomy), retain → KL; ``npo_all`` — NPO on the chosen response of every such pair,
retain → KL. The NLL anchor λ goes to every preference term's winner alike (y_l for reversed
DPO, y_c for corrections; NPO has no winner); the retain NLL μ to every retain row's chosen answer
(computed from the same forward as the KL), for every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from trace_ray import losses as L
from trace_ray.logprobs import encode_pairs, kl_and_logps, reference_view, response_lengths, select_rows, sequence_logps
from trace_ray.train.config import retain_has_loss

PREF_CATEGORIES = ("invert", "punish")
DUMMY_ROW = {"id": "_dummy", "prompt": "x", "chosen": "x", "rejected": "x"}


@dataclass
class StepSettings:
    method: str = "trace"
    beta: float = 0.3
    alpha_kl: float = 0.1
    npo_normalize: bool = True
    nll_anchor: float = 0.0
    retain_nll: float = 0.0
    max_length: int = 256
    reference_mode: str = "adapter_disabled"  # precomputed | adapter_disabled | frozen_copy
    nominal_batch: int = 8  # B: the loss is a sum over rows divided by B
    # ZeRO-3 gathers parameters inside every forward, so every rank must run the same forwards:
    # a micro-batch without preference (or retain) rows then runs a zero-weight dummy row.
    always_forward: bool = False

    @property
    def retain_rows(self) -> bool:
        return retain_has_loss(self.alpha_kl, self.retain_nll)

    @classmethod
    def from_run(cls, cfg) -> "StepSettings":
        return cls(
            method=cfg.method, beta=cfg.loss.beta, alpha_kl=cfg.loss.alpha_kl,
            npo_normalize=cfg.loss.npo_normalize, nll_anchor=cfg.loss.nll_anchor,
            retain_nll=cfg.loss.retain_nll,
            max_length=cfg.data.max_length, reference_mode=cfg.reference.mode,
            nominal_batch=cfg.train.batch_size,
            always_forward=cfg.backend.kind == "deepspeed" and cfg.backend.zero_stage == 3,
        )


def method_category(method: str, category: str) -> int:
    """The loss code a row gets under ``method`` (``losses.INVERT``/``PUNISH``/``RETAIN``/``UNRESOLVED``)."""
    if category == "retain":
        return L.RETAIN
    if category not in PREF_CATEGORIES:
        return L.UNRESOLVED
    if method == "trace":
        return L.INVERT if category == "invert" else L.PUNISH
    if method == "naive_dpo":
        return L.INVERT  # flip every pair whose chosen is non-compliant
    if method == "npo_all":
        return L.PUNISH  # NPO on the chosen response only (see compute_loss)
    raise ValueError(f"method: {method!r} is not one of trace, naive_dpo, npo_all")


# ------------------------------------------------------------------------------- collation
def collate(tokenizer, records: Sequence[Mapping[str, Any]], settings: StepSettings) -> dict:
    """Records (canonical + ``category``, optional ``weight``, ``corrected``, ``ref_*_logps``,
    ``_pad``) → a micro-batch dict.

    ``pref``: ``encode_pairs`` of the preference rows ([2P, T] or [3P, T]); ``pref_cat`` [P] loss
    codes; ``pref_w`` [P] weights; ``pref_ref`` [2P] / [3P] precomputed reference log-probs (or
    None); ``kl``: the retain rows' ``prompt+chosen`` ([R, T]; for the KL and the retain NLL);
    ``n_rows`` rows counted.
    A ``_pad`` row (used when a worker's shard runs out) contributes no loss.
    """
    live = [r for r in records if not r.get("_pad")]
    pref = [r for r in live if r["category"] in PREF_CATEGORIES]
    ret = [r for r in live if r["category"] == "retain"] if settings.retain_rows else []
    out: dict = {"n_rows": len(live), "pref": None, "kl": None, "kl_cat": None}
    if settings.always_forward:
        dummy = dict(next(iter(records), None) or DUMMY_ROW, category="unresolved", weight=0.0, corrected=None)
        if not pref:
            pref = [dummy]
        if settings.retain_rows and not ret:
            ret = [dummy]
        out["kl_cat"] = torch.tensor([L.RETAIN if r["category"] == "retain" else L.UNRESOLVED for r in ret])
    if pref:
        with_c = settings.method == "trace" and any(r.get("corrected") for r in pref)
        enc = encode_pairs(tokenizer, pref, settings.max_length, with_corrected=with_c)
        out["pref"] = enc
        out["pref_cat"] = torch.tensor([method_category(settings.method, r["category"]) for r in pref])
        out["pref_w"] = torch.tensor([float(r.get("weight", 1.0) if r.get("weight") is not None else 1.0) for r in pref])
        if settings.reference_mode == "precomputed":
            keys = ["ref_chosen_logps", "ref_rejected_logps"] + (["ref_corrected_logps"] if with_c else [])
            vals = []
            for k in keys:
                for r in pref:
                    v = r.get(k)
                    missing = v is None or (isinstance(v, float) and math.isnan(v))
                    if missing and r["category"] in PREF_CATEGORIES and not (k == "ref_corrected_logps" and not r.get("corrected")):
                        raise ValueError(f"reference.mode=precomputed but row {r.get('id')} has no {k}")
                    vals.append(0.0 if missing else float(v))
            out["pref_ref"] = torch.tensor(vals, dtype=torch.float32)
        else:
            out["pref_ref"] = None
    if ret:
        enc = encode_pairs(tokenizer, ret, settings.max_length)
        out["kl"] = select_rows(enc, list(range(len(ret))))  # the chosen rows
    return out


# ------------------------------------------------------------------------------- the loss
def _unwrap(model):
    return getattr(model, "module", model)


def reference_model(model, ref_model, mode: str):
    """The frozen copy when the reference needs one (``frozen_copy``, or ``precomputed`` on a full
    fine-tune with the KL on), else None: the base with the adapter disabled."""
    return ref_model if mode == "frozen_copy" or (mode == "precomputed" and ref_model is not None) else None


@torch.no_grad()
def _reference_logps(model, ref_model, batch, mode: str) -> torch.Tensor:
    """Reference log-probs from the adapter-disabled base or the frozen copy."""
    with reference_view(_unwrap(model), reference_model(model, ref_model, mode)) as ref:
        return sequence_logps(ref, batch)


def compute_loss(model, batch: dict, settings: StepSettings, ref_model=None) -> tuple[torch.Tensor, dict]:
    """The micro-batch loss (scalar, with gradient) and detached statistics.

    ``loss = (Σ_pref w_i·L_i + Σ_retain (α_KL·KL_i + μ·NLL_i/|y_i|)) / B`` with B = ``settings.nominal_batch``
    (``losses.trace_loss`` with ``reduction="sum"``). Stats are sums and counts (``*_sum``,
    ``n_*``) so they can be added over micro-steps and all-reduced over workers before dividing.
    """
    net = _unwrap(model)
    device = next(net.parameters()).device
    B = float(settings.nominal_batch)
    total = torch.zeros((), device=device)
    stats: dict[str, float] = {"n_rows": float(batch["n_rows"])}
    enc = batch["pref"]
    if enc is not None:
        P = batch["pref_cat"].shape[0]
        pol = sequence_logps(net, enc)
        if batch["pref_ref"] is not None:
            ref = batch["pref_ref"].to(device)
        else:
            ref = _reference_logps(model, ref_model, enc, settings.reference_mode)
        cat = batch["pref_cat"].to(device)
        w = batch["pref_w"].to(device)
        lens = response_lengths(enc).to(device)
        pc, pr, rc, rr = pol[:P], pol[P : 2 * P], ref[:P], ref[P : 2 * P]
        corr = {}
        if "has_corrected" in enc:
            corr = dict(
                policy_corrected_logps=pol[2 * P :], ref_corrected_logps=ref[2 * P :],
                has_corrected=enc["has_corrected"].to(device), corrected_lengths=lens[2 * P :],
            )
        if settings.method == "npo_all":
            # NPO on y_w alone: dual NPO with the y_l term pinned at policy = reference (its
            # gradient is 0), minus that constant so the value is NPO(y_w) exactly.
            pref_total, parts = L.trace_loss(
                cat, pc, rc.detach(), rc, rc.detach(), w, None, beta=settings.beta, alpha_kl=0.0,
                npo_normalize=settings.npo_normalize, reduction="sum",
            )
            const = L.npo_loss(rc.new_zeros(()), rc.new_zeros(()), settings.beta, settings.npo_normalize)
            shift = const * torch.where(cat == L.PUNISH, w, torch.zeros_like(w)).sum()
            pref_total = pref_total - shift
            parts["L_II"] = parts["L_II"] - shift.detach()
        else:
            pref_total, parts = L.trace_loss(
                cat, pc, pr, rc, rr, w, None, beta=settings.beta, alpha_kl=0.0,
                npo_normalize=settings.npo_normalize, nll_lambda=settings.nll_anchor,
                chosen_lengths=lens[:P], rejected_lengths=lens[P : 2 * P], reduction="sum", **corr,
            )
        total = total + pref_total / B
        margin = settings.beta * ((pr - rr) - (pc - rc)).detach()  # reversed-DPO reward margin
        is_inv = cat == L.INVERT
        real = (cat == L.INVERT) | (cat == L.PUNISH)
        wr = w[real]
        stats.update(
            L_I_sum=float(parts["L_I"]), L_II_sum=float(parts["L_II"]), L_anchor_sum=float(parts["L_anchor"]),
            n_invert=float(parts["n_invert"]), n_punish=float(parts["n_punish"]),
            margin_sum=float(margin[is_inv].sum()), acc_sum=float((margin[is_inv] > 0).float().sum()),
            w_sum=float(wr.sum()), w_sq_sum=float((wr * wr).sum()),
            w_max=float(wr.max()) if wr.numel() else 0.0, n_w=float(wr.numel()),
            # unweighted per-category means, comparable across weightings (for "losses go down")
            raw_I_sum=float(L.invert_loss(pc, pr, rc, rr, settings.beta).detach()[is_inv].sum())
            if settings.method != "npo_all" else 0.0,
            raw_II_sum=float(L.punish_loss(pc, pr, rc, rr, settings.beta, settings.npo_normalize).detach()[cat == L.PUNISH].sum())
            if settings.method == "trace" else 0.0,
        )
    kl_enc = batch["kl"]
    if kl_enc is not None:
        if settings.alpha_kl > 0:
            kl, pol_lp = kl_and_logps(net, kl_enc, reference_model(model, ref_model, settings.reference_mode))
        else:
            kl, pol_lp = None, sequence_logps(net, kl_enc)
        cat = batch["kl_cat"].to(device) if batch.get("kl_cat") is not None else torch.full((pol_lp.shape[0],), L.RETAIN, dtype=torch.long, device=device)
        if kl is not None:
            z = torch.zeros_like(kl)
            kl_total, parts = L.trace_loss(
                cat, z, z, z, z, None, kl, beta=settings.beta, alpha_kl=settings.alpha_kl, reduction="sum"
            )
            total = total + kl_total / B
            stats.update(L_KL_sum=float(parts["L_KL"]))
        stats["n_retain"] = float((cat == L.RETAIN).sum())
        if settings.retain_nll > 0:
            nll = L.nll_anchor(pol_lp, response_lengths(kl_enc).to(device), settings.retain_nll)
            rnll = torch.where(cat == L.RETAIN, nll, torch.zeros_like(nll)).sum()
            total = total + rnll / B
            stats["L_retain_nll_sum"] = float(rnll.detach())
    stats["loss_sum"] = float(total.detach()) * B
    return total, stats


def autocast_context(cfg, device, deepspeed: bool = False):
    """``train.mixed_precision: bf16`` without DeepSpeed: the forward (and so the backward) in bf16
    under ``torch.autocast``, parameters, gradients and optimiser states stay fp32. DeepSpeed runs
    its own bf16 mode instead; "no": nothing."""
    import contextlib

    if cfg.train.mixed_precision != "bf16" or deepspeed:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


STAT_MAX = ("w_max",)


def merge_stats(acc: dict, new: dict) -> dict:
    """Add micro-step stats (sums/counts); maxima stay maxima."""
    for k, v in new.items():
        acc[k] = max(acc.get(k, -math.inf), v) if k in STAT_MAX else acc.get(k, 0.0) + v
    return acc


def summarize(s: dict, nominal_rows: float) -> dict:
    """Summed stats (over micro-steps and workers) → per-step metrics.

    ``loss`` is the optimised objective (sum / nominal global batch rows); ``L_I``, ``L_II`` are
    weighted means over their rows, ``L_KL`` the mean KL over retain rows; ``raw_L_I``/``raw_L_II``
    the unweighted means; ``margin``/``reward_acc`` the reversed-DPO margins of invert rows.
    """
    def mean(key, n):
        c = s.get(n, 0.0)
        return s.get(key, 0.0) / c if c else None

    n_w = s.get("n_w", 0.0)
    w_mean = s.get("w_sum", 0.0) / n_w if n_w else None
    out = {
        "loss": s.get("loss_sum", 0.0) / nominal_rows,
        "L_I": mean("L_I_sum", "n_invert"), "L_II": mean("L_II_sum", "n_punish"),
        "L_KL": mean("L_KL_sum", "n_retain"), "L_anchor": mean("L_anchor_sum", "n_w"),
        "L_retain_nll": mean("L_retain_nll_sum", "n_retain"),
        "raw_L_I": mean("raw_I_sum", "n_invert"), "raw_L_II": mean("raw_II_sum", "n_punish"),
        "margin": mean("margin_sum", "n_invert"), "reward_acc": mean("acc_sum", "n_invert"),
        "w_mean": w_mean,
        "w_std": math.sqrt(max(0.0, s.get("w_sq_sum", 0.0) / n_w - w_mean**2)) if n_w else None,
        "w_max": s.get("w_max") if n_w else None,
        "rows": s.get("n_rows", 0.0),
        "n_invert": s.get("n_invert", 0.0), "n_punish": s.get("n_punish", 0.0), "n_retain": s.get("n_retain", 0.0),
    }
    return out


STAT_KEYS = (
    "n_rows", "loss_sum", "L_I_sum", "L_II_sum", "L_KL_sum", "L_anchor_sum", "L_retain_nll_sum", "n_invert", "n_punish",
    "n_retain", "margin_sum", "acc_sum", "w_sum", "w_sq_sum", "w_max", "n_w", "raw_I_sum", "raw_II_sum",
)


def stats_tensor(s: dict) -> torch.Tensor:
    return torch.tensor([s.get(k, 0.0) for k in STAT_KEYS], dtype=torch.float64)


def tensor_stats(t: torch.Tensor) -> dict:
    return {k: float(v) for k, v in zip(STAT_KEYS, t.tolist())}

