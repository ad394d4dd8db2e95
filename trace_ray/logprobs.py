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


def _inputs(model, batch: Mapping[str, torch.Tensor]) -> dict:
    """Device tensors of a batch and the scored positions: ``sel [N, T]`` logit positions that
    predict a response token, ``labels [M]`` those tokens, ``rows [M]`` their sequence."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attn = batch["attention_mask"].to(device)
    sel = logits_mask(batch["loss_mask"].to(device))
    return {
        "input_ids": input_ids, "attention_mask": attn, "sel": sel,
        "labels": input_ids[:, 1:][sel[:, :-1]], "rows": sel.nonzero()[:, 0],
        # from the attention mask, so left and right padding give the same numbers
        "position_ids": (attn.cumsum(-1) - 1).clamp_min(0),
    }


def _hidden(backbone, x: dict) -> torch.Tensor:
    return backbone(input_ids=x["input_ids"], attention_mask=x["attention_mask"], position_ids=x["position_ids"],
                    use_cache=False)[0]


def _logits(model, x: dict) -> torch.Tensor:
    return model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], position_ids=x["position_ids"],
                 use_cache=False).logits


def _zero3(head) -> bool:
    """Whether the head's weight is partitioned by DeepSpeed ZeRO-3 (it sets ``ds_id``): each
    call of the head then gathers it, a collective when there is more than one rank."""
    return head is not None and any(hasattr(p, "ds_id") for p in head.parameters())


def _num_chunks(M: int, step: int, head) -> int:
    """Chunks of ``step`` positions for ``M`` positions. Under ZeRO-3 every rank must call the
    head the same number of times whatever its rows (else the gathers mismatch: a hang or wrong
    numbers), so it is the largest count over the ranks — one small all-reduce per forward."""
    n = -(-M // step)
    import torch.distributed as dist

    if _zero3(head) and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([n], dtype=torch.long, device=next(head.parameters()).device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n = int(t)
    return n


def _dummy(x: torch.Tensor) -> torch.Tensor:
    """A one-position stand-in for an empty chunk, on ``x``'s graph when ``x`` has one (so the
    backward also runs through the head, as on the ranks with real positions)."""
    d = x.new_zeros((1,) + tuple(x.shape[1:]))
    return d + x.sum() * 0 if x.requires_grad else d


def _chunked(fn, inputs: list[torch.Tensor], head, V: int, n_out: int) -> tuple[list[torch.Tensor], torch.Tensor | float]:
    """``fn(*chunk) -> tuple of [c] tensors`` over chunks of the M positions of ``inputs`` (each
    ``[M, ...]``), ``CHUNK_ELEMENTS // V`` positions at a time; returns the ``n_out`` concatenated outputs
    and a 0 tied to any stand-in chunk (add it to the result to keep those calls in the graph).

    When a backward follows and there is more than one chunk, each chunk is checkpointed: its
    ``[chunk, V]`` logits are recomputed in the backward instead of being kept, so memory holds
    one chunk of logits (what a fused cross-entropy achieves) for one extra head matmul.
    """
    M = inputs[0].shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, V))
    n = _num_chunks(M, step, head)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    # ZeRO-3 gathers the head's weight in its forward hook; the non-reentrant checkpoint's
    # recompute (inside the backward) sees the released shard, the reentrant one re-runs the
    # forward hooks (as DeepSpeed's own activation checkpointing does). Elsewhere non-reentrant,
    # which also works under torch.autograd.grad (impact scores, g_J).
    reentrant = _zero3(head)
    outs: list[tuple] = []
    zero: torch.Tensor | float = 0.0
    for i in range(n):
        s = i * step
        chunk = [x[s : s + step] for x in inputs] if s < M else [_dummy(x) for x in inputs]
        if grad and n > 1:
            from torch.utils.checkpoint import checkpoint

            r = checkpoint(fn, *chunk, use_reentrant=reentrant)
        else:
            r = fn(*chunk)
        if s < M:
            outs.append(r)
        else:
            zero = zero + sum(t.sum() for t in r) * 0
    if not outs:
        return [inputs[0].new_zeros(0, dtype=torch.float32) for _ in range(n_out)], zero
    return [torch.cat(parts) for parts in zip(*outs)], zero


def _chunk_logps(source: torch.Tensor, labels: torch.Tensor, head) -> tuple[torch.Tensor]:
    logits = (head(source) if head is not None else source).float()
    return (logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1),)


def _label_logps(source: torch.Tensor, labels: torch.Tensor, head=None) -> tuple[torch.Tensor, torch.Tensor | float]:
    """``log p(label)`` for M positions, ``[M]`` fp32 (``logit[label] − logsumexp(logit)``), in
    chunks, plus the stand-in 0 of :func:`_chunked`. ``source`` is ``[M, H]`` hidden states
    (``head`` given) or ``[M, V]`` logits."""
    V = head.out_features if head is not None and hasattr(head, "out_features") else source.shape[-1]
    (tok,), zero = _chunked(lambda s, l: _chunk_logps(s, l, head), [source, labels], head, V, 1)
    return tok, zero


def sequence_logps(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-sequence response log-probs ``[N]`` fp32, one forward over all rows:
    ``logps[n] = Σ_t loss_mask[n, t] · log p(input_ids[n, t] | input_ids[n, <t])``.

    For HF causal LMs the LM head runs only on the scored positions, in chunks (see
    :func:`_chunked`); models with a logit transform after the head take their own forward.
    """
    x = _inputs(model, batch)
    split = _split(model)
    if split is not None:
        backbone, head = split
        tok, zero = _label_logps(_hidden(backbone, x)[x["sel"]], x["labels"], head=head)
    else:
        tok, zero = _label_logps(_logits(model, x)[x["sel"]], x["labels"])
    N = x["input_ids"].shape[0]
    return torch.zeros(N, dtype=torch.float32, device=tok.device).index_add(0, x["rows"], tok) + zero


@contextlib.contextmanager
def reference_view(model, ref_model=None):
    """The reference as a model: ``ref_model`` (a frozen copy) when given, else ``model`` in eval
    mode with its peft adapter disabled (exactly the base, DESIGN §6). Use under ``no_grad``."""
    if ref_model is not None:
        yield ref_model
        return
    if not hasattr(model, "disable_adapter"):
        raise ValueError("the reference needs a LoRA model (adapter disabled) or a frozen copy")
    with eval_mode(model), model.disable_adapter():
        yield model


def _kl_chunk(h, rh, labels, head, ref_head) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(p_ref ‖ p_θ) and log p_θ(label), from one chunk of hidden states."""
    from trace_ray.losses import token_kl

    pol = head(h).float()
    pol_lp = pol - torch.logsumexp(pol, dim=-1, keepdim=True)
    with torch.no_grad():
        ref = ref_head(rh).float()
        ref_lp = ref - torch.logsumexp(ref, dim=-1, keepdim=True)
    return token_kl(ref_lp, pol_lp), pol_lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def kl_and_logps(model, batch: Mapping[str, torch.Tensor], ref_model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kl [N], logps [N])``: the token-level forward KL(p_ref ‖ p_θ) of each row, averaged over
    its response positions (``losses.forward_kl`` on the retain rows), and the rows' log-probs.

    The reference is ``ref_model`` or ``model`` with its adapter disabled (:func:`reference_view`).
    For HF causal LMs the two models' hidden states go through their LM heads a chunk of
    positions at a time, each chunk checkpointed: the ``[N, T, V]`` logits of policy and
    reference are never held, only one ``[chunk, V]`` pair, in the forward and again (recomputed)
    in the backward. Models with a logit transform after the head use their full logits.
    """
    from trace_ray.losses import forward_kl

    x = _inputs(model, batch)
    N = x["input_ids"].shape[0]
    split = _split(model)
    with torch.no_grad(), reference_view(model, ref_model) as ref:
        ref_split = _split(ref)
        if split is None or ref_split is None:
            ref_logits = _logits(ref, x)
        else:
            ref_hidden = _hidden(ref_split[0], x)
    if split is None or ref_split is None:
        logits = _logits(model, x)
        tok, zero = _label_logps(logits[x["sel"]], x["labels"])
        kl = forward_kl(ref_logits, logits, x["sel"])
    else:
        (backbone, head), ref_head = split, ref_split[1]
        if ref_model is None and hasattr(head, "disable_adapters"):  # a LoRA-wrapped head: base head for p_ref
            def ref_call(h):
                with model.disable_adapter():
                    return head(h)
        else:
            ref_call = ref_head
        V = getattr(head, "out_features", None) or _vocab(model)
        (kl_t, tok), zero = _chunked(
            lambda h, rh, l: _kl_chunk(h, rh, l, head, ref_call),
            [_hidden(backbone, x)[x["sel"]], ref_hidden[x["sel"]], x["labels"]], head, V, 2,
        )
        count = x["sel"].sum(-1).clamp_min(1).to(torch.float32)
        kl = torch.zeros(N, dtype=torch.float32, device=kl_t.device).index_add(0, x["rows"], kl_t) / count
    logps = torch.zeros(N, dtype=torch.float32, device=tok.device).index_add(0, x["rows"], tok)
    return kl + zero, logps + zero


def _vocab(model) -> int:
    return int(getattr(getattr(_unwrap(model), "config", None), "vocab_size", 0) or 1)


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
    """Reference log-probs ``[N]`` fp32: no grad, eval mode, peft adapter disabled (the exact base,
    DESIGN §6), so LoRA runs need no second copy of the model; a model without an adapter is
    scored as it is (θ itself: the reference only while θ = θ_ref)."""
    with torch.no_grad():
        if not hasattr(model, "disable_adapter"):
            with eval_mode(model):
                return sequence_logps(model, batch)
        with reference_view(model) as ref:
            return sequence_logps(ref, batch)
