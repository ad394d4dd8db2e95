"""TRACE Stage 2: the hybrid objectives as pure per-sample functions (DESIGN §1).

Every loss takes per-sequence log-probs (``logp(y|x) = Σ_t log p(y_t | x, y_<t)`` over response
tokens, shape ``[B]``, fp32) and returns one value per sample, shape ``[B]``, never reduced.
Weights, category masks and the reduction are applied once, in :func:`trace_loss`.

Notation: ``r(y) = logp_θ(y|x) − logp_ref(y|x)``; y_w = ``chosen`` (the original winner),
y_l = ``rejected``, y_c = an oracle-written compliant correction.

Imports only torch and the standard library.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

# Category codes used in tensors (same names and order as trace_ray.data.schema.CATEGORIES).
CATEGORIES = ("invert", "punish", "retain", "unresolved")
CATEGORY_CODES = {name: i for i, name in enumerate(CATEGORIES)}
INVERT, PUNISH, RETAIN, UNRESOLVED = range(4)


def category_codes(category: torch.Tensor | Sequence[str], device=None) -> torch.Tensor:
    """``[B]`` long codes from a tensor of codes or a list of category names (unknown → error)."""
    if isinstance(category, torch.Tensor):
        return category.to(device=device, dtype=torch.long)
    try:
        codes = [CATEGORY_CODES[c] for c in category]
    except KeyError as e:
        raise ValueError(f"category: unknown value {e.args[0]!r}; valid: {list(CATEGORIES)}") from None
    return torch.tensor(codes, dtype=torch.long, device=device)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7): ``−log σ(β·(r(y_chosen) − r(y_rejected)))``, ``[B]``.

    At policy = reference both margins are 0, so the loss is ``−log σ(0) = ln 2`` per sample.
    """
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin)


def npo_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float, normalize: bool = True
) -> torch.Tensor:
    """NPO (Zhang et al. 2024, Eq. 3): ``−(2/β)·log σ(−β·r(y))`` per response, ``[B]``.

    NPO is DPO without a winner. ``normalize=True`` keeps NPO's own ``2/β`` factor (our default);
    ``normalize=False`` drops it, as the TRACE authors' code does. At policy = reference:
    ``(2/β)·ln 2`` (normalised) or ``ln 2``.
    """
    loss = -F.logsigmoid(-beta * (policy_logps - ref_logps))
    return loss * (2.0 / beta) if normalize else loss


def invert_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """D_I, reversed DPO: ``L_I = −log σ(β·(r(y_l) − r(y_w)))``, ``[B]``.

    Arguments are in the dataset's orientation (chosen = y_w, the now non-compliant winner); the
    roles are swapped here so callers never have to.
    """
    return dpo_loss(policy_rejected_logps, policy_chosen_logps, ref_rejected_logps, ref_chosen_logps, beta)


def punish_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    normalize: bool = True,
) -> torch.Tensor:
    """D_II, dual NPO: ``L_II = Σ_{y∈{y_w,y_l}} −(2/β)·log σ(−β·r(y))``, ``[B]``."""
    return npo_loss(policy_chosen_logps, ref_chosen_logps, beta, normalize) + npo_loss(
        policy_rejected_logps, ref_rejected_logps, beta, normalize
    )


def corrected_loss(
    policy_corrected_logps: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_corrected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """D_II with a compliant correction y_c: ``DPO(y_c ≻ y_w) + DPO(y_c ≻ y_l)``, ``[B]``.

    A sum (not a mean) of the two terms, like dual NPO's sum over both responses; at
    policy = reference it is ``2·ln 2``.
    """
    return dpo_loss(policy_corrected_logps, policy_chosen_logps, ref_corrected_logps, ref_chosen_logps, beta) + dpo_loss(
        policy_corrected_logps, policy_rejected_logps, ref_corrected_logps, ref_rejected_logps, beta
    )


def nll_anchor(winner_logps: torch.Tensor, winner_lengths: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """RPO-style anchor: ``λ · (−logp_θ(y_win|x)) / |y_win|`` (per-token NLL of the winner), ``[B]``.

    ``winner_lengths`` = number of scored response tokens (``loss_mask.sum(-1)``); clamped at 1.
    """
    return lam * (-winner_logps) / winner_lengths.to(winner_logps.dtype).clamp_min(1.0)


def token_kl(ref_logps: torch.Tensor, policy_logps: torch.Tensor) -> torch.Tensor:
    """``KL_t = Σ_v p_ref(v)·(log p_ref(v) − log p_θ(v))`` per position, from normalised log-probs
    ``[..., V]`` → ``[...]``. 0 where the two distributions are equal; ≥ 0 always."""
    return (ref_logps.exp() * (ref_logps - policy_logps)).sum(-1)


def forward_kl(ref_logits: torch.Tensor, policy_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level forward KL(p_ref ‖ p_θ), mean over masked positions per sample, ``[N]``.

    ``KL_t = Σ_v p_ref(v) · (log p_ref(v) − log p_θ(v))``; ``ref_logits``/``policy_logits``
    ``[N, T, V]``, ``mask`` ``[N, T]`` aligned with the *logit* positions (position t scores token
    t+1: use :func:`trace_ray.logprobs.logits_mask`). Rows with no masked position give 0.
    Computed in fp32 on full ``[N, T, V]`` logits; the trainer computes the same numbers from
    hidden states a chunk of positions at a time (``trace_ray.logprobs.kl_and_logps``).
    """
    kl_t = token_kl(F.log_softmax(ref_logits.float(), dim=-1), F.log_softmax(policy_logits.float(), dim=-1))  # [N, T]
    m = mask.to(kl_t.dtype)
    return (kl_t * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def preference_losses(
    category: torch.Tensor | Sequence[str],
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.3,
    npo_normalize: bool = True,
    policy_corrected_logps: torch.Tensor | None = None,
    ref_corrected_logps: torch.Tensor | None = None,
    has_corrected: torch.Tensor | None = None,
    nll_lambda: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    corrected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted per-sample preference loss by category and its NLL-anchor part, both ``[B]``.

    invert → :func:`invert_loss` (+ anchor on y_l); punish → :func:`punish_loss`, or
    :func:`corrected_loss` (+ anchor on y_c) where ``has_corrected``; retain/unresolved → 0.
    The first tensor already includes the anchor. Used by :func:`trace_loss` and by the impact
    scores (``trace_ray.impact``), so training and scoring share one definition.
    """
    cat = category_codes(category, device=policy_chosen_logps.device)
    zero = torch.zeros_like(policy_chosen_logps)
    inv = invert_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    pun = punish_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, npo_normalize
    )
    anchor = zero
    if nll_lambda:
        if rejected_lengths is None:
            raise ValueError("nll_lambda > 0 needs rejected_lengths (and corrected_lengths with y_c)")
        anchor = torch.where(cat == INVERT, nll_anchor(policy_rejected_logps, rejected_lengths, nll_lambda), zero)
    if has_corrected is not None and bool(has_corrected.any()):
        if policy_corrected_logps is None or ref_corrected_logps is None:
            raise ValueError("has_corrected is set but policy/ref corrected log-probs are missing")
        hc = has_corrected.to(device=cat.device, dtype=torch.bool) & (cat == PUNISH)
        cor = corrected_loss(
            policy_corrected_logps, policy_chosen_logps, policy_rejected_logps,
            ref_corrected_logps, ref_chosen_logps, ref_rejected_logps, beta,
        )
        pun = torch.where(hc, cor, pun)
        if nll_lambda:
            if corrected_lengths is None:
                raise ValueError("nll_lambda > 0 with corrected responses needs corrected_lengths")
            anchor = torch.where(hc, nll_anchor(policy_corrected_logps, corrected_lengths, nll_lambda), anchor)
    loss = torch.where(cat == INVERT, inv, torch.where(cat == PUNISH, pun, zero))
    return loss + anchor, anchor


def trace_loss(
    category: torch.Tensor | Sequence[str],
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    weights: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    *,
    beta: float = 0.3,
    alpha_kl: float = 0.1,
    npo_normalize: bool = True,
    nll_lambda: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    policy_corrected_logps: torch.Tensor | None = None,
    ref_corrected_logps: torch.Tensor | None = None,
    has_corrected: torch.Tensor | None = None,
    corrected_lengths: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_TRACE = Σ_{i∈D_I∪D_II} w_i·L_i + α_KL·L_KL`` for one batch (DESIGN §1, Stage 2).

    The only place where weights, category masks and the reduction are applied.

    Args (all ``[B]``): ``category`` codes (:data:`CATEGORY_CODES`) or names; the four log-prob
    tensors in dataset orientation (chosen = y_w); ``weights`` the alignment-impact weights w_i
    (``None`` → 1; only read on invert/punish rows); ``kl`` per-sample forward KL
    (:func:`forward_kl`; only read on retain rows, ``None`` → no KL term). The NLL anchor (λ =
    ``nll_lambda``, default 0 as in the paper) is part of L_i, so it is weighted by w_i too.

    ``reduction="mean"``: preference part ``Σ w_i L_i / n_pref`` (n_pref = invert+punish rows in
    the batch) plus ``α_KL · Σ_retain KL / n_retain``; ``"sum"``: both numerators un-divided, for
    callers that normalise by a global count (e.g. across Ray Train workers).

    Returns ``(total, parts)``: ``total`` a scalar with gradient; ``parts`` detached scalars
    ``L_I``, ``L_II`` (weighted, reduced, anchor included), ``L_KL`` (reduced, before α_KL),
    ``L_anchor`` (the weighted anchor share of L_I + L_II), ``n_invert``, ``n_punish``,
    ``n_retain``; ``total = L_I + L_II + α_KL·L_KL``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: {reduction!r} is not one of ['mean', 'sum']")
    cat = category_codes(category, device=policy_chosen_logps.device)
    per, anchor = preference_losses(
        cat, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=beta, npo_normalize=npo_normalize, policy_corrected_logps=policy_corrected_logps,
        ref_corrected_logps=ref_corrected_logps, has_corrected=has_corrected, nll_lambda=nll_lambda,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        corrected_lengths=corrected_lengths,
    )
    is_inv, is_pun, is_ret = cat == INVERT, cat == PUNISH, cat == RETAIN
    w = torch.ones_like(per) if weights is None else weights.to(per)
    # torch.where (not multiplication) so a NaN/inf loss on a masked-out row cannot leak in.
    zero = torch.zeros_like(per)
    w_inv = torch.where(is_inv, w * per, zero)
    w_pun = torch.where(is_pun, w * per, zero)
    w_anchor = torch.where(is_inv | is_pun, w * anchor, zero)
    kl_rows = zero if kl is None else torch.where(is_ret, kl.to(per), zero)
    if reduction == "mean":
        n_pref = float((is_inv | is_pun).sum().clamp_min(1))
        n_ret = float(is_ret.sum().clamp_min(1))
    else:
        n_pref = n_ret = 1.0
    l_i, l_ii = w_inv.sum() / n_pref, w_pun.sum() / n_pref
    l_kl = kl_rows.sum() / n_ret
    total = l_i + l_ii + alpha_kl * l_kl
    parts = {
        "L_I": l_i.detach(),
        "L_II": l_ii.detach(),
        "L_KL": l_kl.detach(),
        "L_anchor": (w_anchor.sum() / n_pref).detach(),
        "n_invert": is_inv.sum().detach(),
        "n_punish": is_pun.sum().detach(),
        "n_retain": is_ret.sum().detach(),
    }
    return total, parts


LN2 = math.log(2.0)
