"""Per-sequence response log-probs from one concatenated, padded forward (DESIGN §1, §4).

``encode_pairs`` turns canonical records into one batch whose rows 0..B-1 are ``prompt+chosen``,
rows B..2B-1 ``prompt+rejected`` (and rows 2B..3B-1 ``prompt+corrected`` with
``with_corrected=True``), padded once to the longest row. ``sequence_logps`` runs the model once
on all rows and returns ``logp(y|x) = Σ_t log p(y_t | x, y_<t)`` over response tokens, in fp32.

Label log-probs are ``logit[label] − logsumexp(logits)``, computed only at response positions and
in chunks: the ``[N, T, V]`` log-softmax is never built (on CPU the vocabulary dominates). When the
model exposes its backbone and LM head (HF causal LMs, peft-wrapped or not), the head itself is
applied only to response positions, so prompt and padding positions never pay for the vocabulary.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Sequence

import torch

from trace_ray.chat import prompt_ids

# fp32 elements per logits chunk (32 MiB): bounds peak memory whatever the vocabulary size.
CHUNK_ELEMENTS = 1 << 23


# ----------------------------------------------------------------------------------- encoding
def encode_response(tokenizer, response: str) -> list[int]:
    """Response token ids followed by eos (the model must also learn where the answer stops)."""
    ids = list(tokenizer(str(response), add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_pairs(
    tokenizer,
    records: Sequence[Mapping[str, Any]],
    max_length: int,
    with_corrected: bool = False,
) -> dict[str, torch.Tensor]:
    """Encode B preference records into one padded batch.

    Args: ``records`` dicts with ``prompt``, ``chosen``, ``rejected`` (and ``corrected`` when
    ``with_corrected``; an empty/None correction still gets a row, use ``has_corrected``).
    Returns ``input_ids``, ``attention_mask``, ``loss_mask`` (long, ``[2B, T]`` or ``[3B, T]``;
    rows 0..B-1 chosen, B..2B-1 rejected, 2B..3B-1 corrected), ``has_corrected`` ``[B]`` bool
    when ``with_corrected``. ``loss_mask[n, t] = 1`` iff token t is a response token (prompt and
    padding are 0). T = the longest row (dynamic padding), on the tokenizer's ``padding_side``.

    Truncation to ``max_length``: a pair's prompt keeps its *last* tokens and is cut the same way
    for all its responses (so every response sees the same x), keeping at least
    ``min(len(prompt), max_length // 2)`` prompt tokens; responses then keep their first tokens.
    """
    if max_length < 2:
        raise ValueError(f"max_length: must be ≥ 2, got {max_length}")
    keys = ("chosen", "rejected", "corrected") if with_corrected else ("chosen", "rejected")
    rows: list[list[list[int]]] = [[] for _ in keys]  # per key: list of (ids) ; masks alongside
    masks: list[list[list[int]]] = [[] for _ in keys]
    has_corrected = []
    for i, rec in enumerate(records):
        for k in ("prompt", "chosen", "rejected"):
            if rec.get(k) is None:
                raise ValueError(f"records[{i}].{k}: missing")
        p = prompt_ids(tokenizer, rec["prompt"])
        corr = rec.get("corrected") if with_corrected else None
        has_corrected.append(bool(corr))
        resp = [encode_response(tokenizer, rec[k] if k != "corrected" else (corr or "")) for k in keys]
        longest = max(len(r) for r in resp)
        keep_p = max(max_length - longest, min(len(p), max_length // 2))
        p_cut = p[-keep_p:] if keep_p < len(p) else p
        for j, r in enumerate(resp):
            r_cut = r[: max_length - len(p_cut)]
            rows[j].append(p_cut + r_cut)
            masks[j].append([0] * len(p_cut) + [1] * len(r_cut))
    all_ids = [ids for per_key in rows for ids in per_key]
    all_masks = [m for per_key in masks for m in per_key]
    if not all_ids:
        raise ValueError("records: empty")
    T = max(len(x) for x in all_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    N = len(all_ids)
    input_ids = torch.full((N, T), pad, dtype=torch.long)
    attention_mask = torch.zeros((N, T), dtype=torch.long)
    loss_mask = torch.zeros((N, T), dtype=torch.long)
    for n, (ids, m) in enumerate(zip(all_ids, all_masks)):
        sl = slice(T - len(ids), T) if left else slice(0, len(ids))
        input_ids[n, sl] = torch.tensor(ids, dtype=torch.long)
        attention_mask[n, sl] = 1
        loss_mask[n, sl] = torch.tensor(m, dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    if with_corrected:
        out["has_corrected"] = torch.tensor(has_corrected, dtype=torch.bool)
    return out


def response_lengths(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Scored response tokens per row, ``[N]`` long (the NLL anchor's ``|y|``)."""
    return batch["loss_mask"].sum(-1)


def logits_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """``loss_mask`` moved onto logit positions: ``out[n, t] = loss_mask[n, t+1]``, ``[N, T]`` bool.

    The logits at position t predict token t+1; this is the ``mask`` :func:`forward_kl` expects.
    """
    out = torch.zeros_like(loss_mask, dtype=torch.bool)
    out[:, :-1] = loss_mask[:, 1:].bool()
    return out


def select_rows(batch: Mapping[str, torch.Tensor], rows: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
    """The ``[N, T]`` tensors of ``batch`` restricted to ``rows`` (e.g. retain chosen rows for KL),
    with all-padding columns trimmed. Other keys are dropped."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    out = {k: batch[k][idx] for k in ("input_ids", "attention_mask", "loss_mask")}
    keep = out["attention_mask"].bool().any(0)
    if keep.any():
        cols = keep.nonzero().squeeze(-1)
        sl = slice(int(cols[0]), int(cols[-1]) + 1)
        out = {k: v[:, sl] for k, v in out.items()}
    return out


# ------------------------------------------------------------------------------- the forward
def _unwrap(model):
    """The HF causal LM inside a peft wrapper (LoRA layers stay injected, so it still uses them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _split(model):
    """``(backbone, head)`` of an HF causal LM, or None when logits need the model's own forward
    (no separate head, or a logit transform such as soft-capping/scaling after the head)."""
    hf = _unwrap(model)
    cfg = getattr(hf, "config", None)
    if cfg is not None and (getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)):
        return None
    backbone = getattr(hf, "base_model", None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if backbone is None or backbone is hf or head is None:
        return None
    return backbone, head


def _chunk_logps(source: torch.Tensor, labels: torch.Tensor, head) -> torch.Tensor:
    logits = (head(source) if head is not None else source).float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _label_logps(source: torch.Tensor, labels: torch.Tensor, head=None) -> torch.Tensor:
    """``log p(label)`` for M positions, ``[M]`` fp32: ``logit[label] − logsumexp(logit)`` in chunks.

    ``source`` is ``[M, H]`` hidden states (``head`` given) or ``[M, V]`` logits. When a backward
    will follow, each chunk from hidden states is checkpointed: its ``[chunk, V]`` logits are
    recomputed in the backward instead of being kept, so memory stays at one chunk of logits
    (what a fused cross-entropy achieves) for one extra head matmul.
    """
    V = head.out_features if head is not None and hasattr(head, "out_features") else source.shape[-1]
    step = max(1, CHUNK_ELEMENTS // max(1, V))
    ckpt = head is not None and torch.is_grad_enabled() and source.requires_grad and source.shape[0] > step
    out = []
    for s in range(0, source.shape[0], step):
        if ckpt:
            from torch.utils.checkpoint import checkpoint

            out.append(checkpoint(_chunk_logps, source[s : s + step], labels[s : s + step], head, use_reentrant=False))
        else:
            out.append(_chunk_logps(source[s : s + step], labels[s : s + step], head))
    return torch.cat(out) if out else source.new_zeros(0, dtype=torch.float32)


def forward_logps(
    model, batch: Mapping[str, torch.Tensor], return_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward over all rows: ``(logps [N] fp32, logits [N, T, V] or None)``.

    ``logps[n] = Σ_t loss_mask[n, t] · log p(input_ids[n, t] | input_ids[n, <t])``. Position ids
    are derived from ``attention_mask`` so left and right padding give the same result. With
    ``return_logits=True`` the full logits (model dtype, unshifted: position t predicts token t+1;
    mask them with :func:`logits_mask`) come back for the retain forward-KL term.
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attn = batch["attention_mask"].to(device)
    sel = logits_mask(batch["loss_mask"].to(device))  # [N, T] logit positions that score a label
    labels = input_ids[:, 1:][sel[:, :-1]]  # [M]
    rows = sel.nonzero()[:, 0]  # [M] which sequence each scored position belongs to
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    split = _split(model)
    logits = None
    if split is not None:
        backbone, head = split
        hidden = backbone(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=False)[0]
        if return_logits:
            logits = head(hidden)
            tok = _label_logps(logits[sel], labels)
        else:
            tok = _label_logps(hidden[sel], labels, head=head)
    else:
        logits = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=False).logits
        tok = _label_logps(logits[sel], labels)
        if not return_logits:
            logits = None
    logps = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=device).index_add(0, rows, tok)
    return logps, logits


def sequence_logps(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-sequence response log-probs ``[N]`` fp32 (see :func:`forward_logps`)."""
    return forward_logps(model, batch)[0]


@contextlib.contextmanager
def eval_mode(model):
    """Run in eval mode (no dropout, deterministic), restoring the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def reference_logps(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Reference log-probs ``[N]`` fp32: no grad, eval mode; a peft model with its adapter
    disabled is exactly the base (DESIGN §6), so LoRA runs need no second copy of the model."""
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with torch.no_grad(), eval_mode(model), ctx:
        return sequence_logps(model, batch)
