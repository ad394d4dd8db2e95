"""TRACE Stage 3: alignment-impact weights (DESIGN §1).

``w_i = ⟨g_J, ∇_θ L_i⟩ / γ``, clamped at 0, then normalised; ``g_J = ∇_θ J`` for a gold objective J.
A positive score means a gradient step on sample i (θ ← θ − η∇L_i) lowers J to first order
(ΔJ ≈ −η⟨g_J, ∇L_i⟩): the sample helps.

``⟨g_J, ∇L_i⟩`` is the directional derivative of L_i along g_J, so a whole batch is scored by
``jvp`` (one forward-mode pass) or ``fd`` (two forward passes at θ ± ε·ĝ_J); ``exact`` (one
backward per sample) is the reference. No per-sample gradient vector is ever materialised by the
fast paths.

**The scoring batch** (:func:`build_score_batch`) is a dict holding the tensors of
:func:`trace_ray.logprobs.encode_pairs` (rows 0..B-1 chosen, B..2B-1 rejected, optionally
2B..3B-1 corrected + ``has_corrected [B]``), ``category [B]`` long codes
(:data:`trace_ray.losses.CATEGORY_CODES`) and ``ref_logps [2B|3B]`` fp32 reference log-probs
(computed with :func:`trace_ray.logprobs.reference_logps` when absent). **The per-sample loss
scored** is the training loss of that sample, :func:`trace_ray.losses.preference_losses`:
invert → reversed DPO; punish → dual NPO (or corrected DPO where ``has_corrected``); plus the NLL
anchor when ``nll_lambda > 0``; retain/unresolved rows have no preference loss and score 0.

Scores are taken in eval mode by default (no dropout: deterministic; the authors' code scores in
train mode, so LoRA dropout makes their weights random). Parameters are the trainable ones,
``[p for p in model.parameters() if p.requires_grad]`` (LoRA only with peft, or all).

Imports only torch and the standard library (plus this package's torch-only helpers).
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from trace_ray.logprobs import encode_pairs, eval_mode, reference_logps, select_rows, sequence_logps
from trace_ray.losses import INVERT, PUNISH, category_codes, dpo_loss, preference_losses

METHODS = ("exact", "jvp", "fd")


def trainable_params(model) -> list[torch.nn.Parameter]:
    """``[p for p in model.parameters() if p.requires_grad]`` — the order g_J is aligned with."""
    return [p for p in model.parameters() if p.requires_grad]


def _trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------ gold batch + J
def build_gold_batch(records: Sequence[Mapping[str, Any]], size: int, seed: int = 0) -> list[dict]:
    """The TRACE authors' gold batch: ⅓ retain pairs as they are, ⅓ invert pairs reversed, the
    rest punish prompts paired with a random compliant response as winner (loser: the original
    non-compliant y_w). Returns up to ``size`` records ``{prompt, chosen, rejected, source_id,
    source_category}``, every one with a compliant ``chosen``.

    Compliant responses for the punish rows are drawn from the retain ``chosen`` and the invert
    ``rejected`` responses. A short pool is topped up from the other pools (retain, invert, punish
    order); with fewer usable records than ``size`` the batch is smaller. Deterministic in ``seed``.
    """
    if size < 1:
        raise ValueError(f"size: must be ≥ 1, got {size}")
    rng = random.Random(seed)
    pools: dict[str, list[dict]] = {"retain": [], "invert": [], "punish": []}
    compliant: list[str] = []
    for i, r in enumerate(records):
        cat = r.get("category")
        rid = r.get("id", str(i))
        if cat == "retain":
            pools["retain"].append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                                    "source_id": rid, "source_category": cat})
            compliant.append(r["chosen"])
        elif cat == "invert":
            pools["invert"].append({"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"],
                                    "source_id": rid, "source_category": cat})
            compliant.append(r["rejected"])
        elif cat == "punish":
            pools["punish"].append({"prompt": r["prompt"], "chosen": None, "rejected": r["chosen"],
                                    "source_id": rid, "source_category": cat})
    if compliant:
        for g in pools["punish"]:
            g["chosen"] = rng.choice(compliant)
    else:
        pools["punish"] = []  # no compliant response anywhere: punish prompts cannot form a pair
    for p in pools.values():
        rng.shuffle(p)
    want = {"retain": size // 3, "invert": size // 3}
    want["punish"] = size - want["retain"] - want["invert"]
    out, spare = [], []
    for k in ("retain", "invert", "punish"):
        out += pools[k][: want[k]]
        spare += pools[k][want[k]:]
    out += spare[: size - len(out)]
    return out


def dpo_objective(beta: float = 0.3,
                  at_reference: bool = False) -> Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]:
    """J = mean DPO loss over a batch of (compliant ≻ other) pairs (the default J).

    The batch is an :func:`encode_pairs` dict, optionally with ``ref_logps [2B]`` (else the
    reference is computed: adapter disabled for peft, else the current θ without grad).
    ``at_reference=True`` (θ is θ_ref, as in :func:`impact_scores`): a batch without ``ref_logps``
    takes the policy's own log-probs, detached, as the reference — no second forward.
    """

    def J(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ref = batch.get("ref_logps")
        if ref is None and not at_reference:
            ref = reference_logps(model, batch)
        lp = sequence_logps(model, batch)
        if ref is None:
            ref = lp.detach()
        B = lp.shape[0] // 2
        ref = ref.to(lp)
        return dpo_loss(lp[:B], lp[B : 2 * B], ref[:B], ref[B : 2 * B], beta).mean()

    return J


def global_gradient(
    model,
    batches: Iterable[Mapping[str, torch.Tensor]],
    J: Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
    eval: bool = True,
) -> list[torch.Tensor]:
    """``g_J = ∇_θ J`` accumulated over several batches, as a list aligned with
    :func:`trainable_params` (fp32, detached).

    ``J(model, batch) -> scalar`` is a per-batch *mean* (default :func:`dpo_objective`); batches
    are combined as ``Σ_b n_b ∇J_b / Σ_b n_b`` with n_b = pairs in batch b (``batch["num_pairs"]``
    if given, else ``input_ids.shape[0] // 2``), i.e. the gradient of the mean over all gold pairs.
    Across Ray Train workers with equal shares, an all-reduce average of the lists gives the same.
    Runs in eval mode (deterministic) unless ``eval=False``.
    """
    J = J or dpo_objective()
    params = trainable_params(model)
    if not params:
        raise ValueError("model: no trainable parameters (requires_grad) to take g_J over")
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    total = 0
    ctx = eval_mode(model) if eval else _nullctx()
    with ctx:
        for batch in batches:
            n = int(batch["num_pairs"]) if "num_pairs" in batch else batch["input_ids"].shape[0] // 2
            loss = J(model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g.float(), alpha=n)
            total += n
    if total == 0:
        raise ValueError("batches: empty; g_J needs at least one gold batch")
    return [a / total for a in acc]


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


# ------------------------------------------------------------------------------ scoring batch
def build_score_batch(
    tokenizer, records: Sequence[Mapping[str, Any]], max_length: int, model=None, with_corrected: bool = False
) -> dict[str, torch.Tensor]:
    """The batch :func:`impact_scores` takes: :func:`encode_pairs` tensors + ``category [B]`` codes
    (+ ``ref_logps`` from ``model``'s reference when a model is given)."""
    batch = encode_pairs(tokenizer, records, max_length, with_corrected=with_corrected)
    batch["category"] = category_codes([r.get("category", "unresolved") for r in records])
    if model is not None:
        batch["ref_logps"] = reference_logps(model, batch)
    return batch


def _sample_losses(
    logps: torch.Tensor, batch: Mapping[str, torch.Tensor], beta: float, npo_normalize: bool, nll_lambda: float,
    ref: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample TRACE preference losses ``[B]`` from the batch's ``[2B|3B]`` log-probs (reference
    log-probs: ``ref`` when given, else ``batch["ref_logps"]``)."""
    cat = batch["category"].to(logps.device)
    B = cat.shape[0]
    ref = (batch["ref_logps"] if ref is None else ref).to(logps)
    lengths = batch["loss_mask"].sum(-1).to(logps.device)
    kw = {}
    if logps.shape[0] == 3 * B:
        kw = dict(
            policy_corrected_logps=logps[2 * B :],
            ref_corrected_logps=ref[2 * B :],
            has_corrected=batch.get("has_corrected", torch.ones(B, dtype=torch.bool)).to(logps.device),
            corrected_lengths=lengths[2 * B :],
        )
    loss, _ = preference_losses(
        cat, logps[:B], logps[B : 2 * B], ref[:B], ref[B : 2 * B], beta=beta, npo_normalize=npo_normalize,
        nll_lambda=nll_lambda, chosen_lengths=lengths[:B], rejected_lengths=lengths[B : 2 * B], **kw,
    )
    return loss


def _rows_of(batch: Mapping[str, torch.Tensor], pairs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sub-batch holding the given pairs (all their rows), with category/ref_logps sliced alike."""
    B = batch["category"].shape[0]
    k = batch["input_ids"].shape[0] // B
    rows = torch.cat([pairs + j * B for j in range(k)])
    sub = select_rows(batch, rows)
    sub["category"] = batch["category"][pairs]
    if "ref_logps" in batch:
        sub["ref_logps"] = batch["ref_logps"][rows]
    if "has_corrected" in batch:
        sub["has_corrected"] = batch["has_corrected"][pairs]
    return sub


class _LogpsModule(torch.nn.Module):
    """Wraps the model so ``torch.func.functional_call`` can swap its parameters for dual tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return sequence_logps(self.model, batch)


def _check_g(params: list[torch.Tensor], g_J: Sequence[torch.Tensor]) -> None:
    if len(g_J) != len(params):
        raise ValueError(f"g_J: {len(g_J)} tensors but the model has {len(params)} trainable parameters")
    for i, (p, g) in enumerate(zip(params, g_J)):
        if tuple(p.shape) != tuple(g.shape):
            raise ValueError(f"g_J[{i}]: shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}")


def impact_scores(
    model,
    batch: Mapping[str, torch.Tensor],
    g_J: Sequence[torch.Tensor],
    method: str = "jvp",
    *,
    beta: float = 0.3,
    npo_normalize: bool = True,
    nll_lambda: float = 0.0,
    fd_delta: float = 0.02,
    fd_eps: float | None = None,
    micro_batch: int | None = None,
    eval: bool = True,
    at_reference: bool = False,
) -> torch.Tensor:
    """Alignment-impact scores ``s_i = ⟨g_J, ∇_θ L_i⟩``, ``[B]`` fp32 (0 on retain/unresolved rows).

    ``method``: ``exact`` — one forward+backward per invert/punish sample, dot with g_J (the
    reference); ``jvp`` — ``torch.func.jvp`` of the batch's per-sample losses along g_J, one
    forward-mode pass (needs eager/math attention); ``fd`` — central difference
    ``‖g‖·(L(θ+εĝ) − L(θ−εĝ)) / 2ε`` with ĝ = g/‖g‖, two no-grad forwards, log-probs in fp32 (use
    fp32 parameters); θ is restored bit-exactly from a copy. The step is ``ε = fd_delta/‖g_J‖``:
    the step along ĝ that changes J by ``fd_delta`` to first order (J ≈ ln 2 at θ_ref), which is
    invariant to how the parameters are scaled; ``fd_eps`` instead sets ``ε = fd_eps·‖θ‖`` (the
    DESIGN's first rule — measured to need 1e-4 for full parameters but 1e-2 for LoRA at B = 0, see
    docs/method.md). ``micro_batch`` splits the batch into chunks of that many pairs (bounds memory; same
    result). ``eval=False`` scores in the model's current mode (train mode: dropout → random).
    The batch layout and the loss scored are described in the module docstring.

    ``at_reference=True`` states that θ IS θ_ref (the paper scores once, before training: a LoRA
    adapter at initialisation, or a full model equal to its frozen copy). A batch without
    ``ref_logps`` then needs no reference pass of its own: the reference log-probs are the
    policy's own, taken from the scoring pass itself — ``jvp``: its primal output (exact);
    ``fd``: the mean of the θ±εĝ log-probs (exact to O(ε²)); ``exact``: the forward it already
    runs.
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {list(METHODS)}")
    params = trainable_params(model)
    _check_g(params, g_J)
    batch = dict(batch)
    if "category" not in batch:
        raise ValueError("batch.category: missing (use build_score_batch)")
    batch["category"] = category_codes(batch["category"])
    fused = at_reference and "ref_logps" not in batch
    if "ref_logps" not in batch and not fused:
        batch["ref_logps"] = reference_logps(model, batch)
    B = batch["category"].shape[0]
    if batch["input_ids"].shape[0] not in (2 * B, 3 * B):
        raise ValueError(f"batch.input_ids: {batch['input_ids'].shape[0]} rows for {B} pairs (want 2B or 3B)")
    cat = batch["category"]
    active = ((cat == INVERT) | (cat == PUNISH)).nonzero().squeeze(-1)
    scores = torch.zeros(B, dtype=torch.float32)
    if active.numel() == 0:
        return scores
    step = micro_batch or active.numel()
    kw = dict(beta=beta, npo_normalize=npo_normalize, nll_lambda=nll_lambda)
    ctx = eval_mode(model) if eval else _nullctx()
    with ctx:
        if method == "exact":
            scores[active] = _exact(model, params, batch, active, g_J, kw, fused)
        else:
            if method == "fd":
                gnorm, eps = _fd_step(params, g_J, fd_delta, fd_eps)
            for s in range(0, active.numel(), step):
                pairs = active[s : s + step]
                sub = _rows_of(batch, pairs)
                if method == "jvp":
                    out = _jvp(model, params, sub, g_J, kw, fused)
                else:
                    out = _fd(model, params, sub, g_J, gnorm, eps, kw, fused)
                scores[pairs] = out.float().cpu()
    return scores


def _exact(model, params, batch, active, g_J, kw, fused=False) -> torch.Tensor:
    out = []
    for i in active.tolist():
        sub = _rows_of(batch, torch.tensor([i]))
        logps = sequence_logps(model, sub)
        loss = _sample_losses(logps, sub, **kw, ref=logps.detach() if fused else None).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(sum(float((g.float() * gj.to(g.device, torch.float32)).sum()) for g, gj in zip(grads, g_J) if g is not None))
    return torch.tensor(out, dtype=torch.float32)


def _jvp(model, params, sub, g_J, kw, fused=False) -> torch.Tensor:
    from torch.func import functional_call, jvp

    wrapper = _LogpsModule(model)
    names = ["model." + n for n in _trainable_names(model)]
    primals = tuple(p.detach() for p in params)
    tangents = tuple(g.to(device=p.device, dtype=p.dtype) for g, p in zip(g_J, params))

    def f(*ps):
        logps = functional_call(wrapper, dict(zip(names, ps)), (sub,))
        # fused: the reference is the primal (detach drops the tangent, so it stays fixed)
        return _sample_losses(logps, sub, **kw, ref=logps.detach() if fused else None)

    # Flash / memory-efficient SDPA kernels have no forward AD: force the math kernel (a no-op
    # for eager attention).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        _, directional = jvp(f, primals, tangents)
    return directional.detach()


def _fd_step(params, g_J, fd_delta: float, fd_eps: float | None) -> tuple[float, float]:
    """(‖g_J‖, ε) in float64: ε = fd_delta/‖g_J‖, or fd_eps·‖θ‖ when fd_eps is given."""
    with torch.no_grad():
        gnorm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in g_J))
        tnorm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params))
    if any(p.dtype != torch.float32 for p in params):
        warnings.warn("impact_scores(method='fd'): parameters are not fp32; the ±ε step loses precision")
    if fd_eps is not None:
        return gnorm, fd_eps * (tnorm if tnorm > 0 else 1.0)
    return gnorm, (fd_delta / gnorm if gnorm > 0 else 0.0)


def _fd(model, params, sub, g_J, gnorm, eps, kw, fused=False) -> torch.Tensor:
    if gnorm == 0:
        return torch.zeros(sub["category"].shape[0])
    saved = [p.detach().clone() for p in params]
    step = [(g.to(device=p.device, dtype=torch.float32) * (eps / gnorm)).to(p.dtype) for g, p in zip(g_J, params)]
    try:
        with torch.no_grad():
            for p, d in zip(params, step):
                p.add_(d)
            lp_plus = sequence_logps(model, sub)
            for p, s, d in zip(params, saved, step):
                p.copy_(s).sub_(d)
            lp_minus = sequence_logps(model, sub)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    # fused: log-probs at θ = their mean at θ±εĝ, to O(ε²) (the same reference on both sides)
    ref = (lp_plus.double() + lp_minus.double()).div(2).float() if fused else None
    plus = _sample_losses(lp_plus, sub, **kw, ref=ref)
    minus = _sample_losses(lp_minus, sub, **kw, ref=ref)
    return (plus.double() - minus.double()) * (gnorm / (2 * eps))


# ------------------------------------------------------------------------------ normalisation
def normalize_weights(
    scores: torch.Tensor, gamma: float = 1.0, mode: str = "l1", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``w = max(s/γ, 0)`` then normalised over the rows in ``mask`` (default: all), ``[B]``.

    ``l1`` (the authors): weights sum to 1 over D_I ∪ D_II; ``mean``: weights average 1, so the
    loss scale does not shrink with the dataset size. Rows outside ``mask`` get 0. If no row has a
    positive score the normalised weights would be 0/0: all masked rows then get the uniform weight
    (1/n for l1, 1 for mean) — plain unweighted TRACE — rather than stopping training.
    """
    if mode not in ("l1", "mean"):
        raise ValueError(f"mode: {mode!r} is not one of ['l1', 'mean']")
    if gamma <= 0:
        raise ValueError(f"gamma: must be > 0, got {gamma}")
    s = scores.double()
    m = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    w = torch.where(m, (s / gamma).clamp_min(0.0), torch.zeros_like(s))
    n = int(m.sum())
    total = w.sum()
    if n == 0:
        return w.float()
    if total <= 0:
        w = m.double()
        total = w.sum()
    w = w / total
    if mode == "mean":
        w = w * n
    return w.float()
