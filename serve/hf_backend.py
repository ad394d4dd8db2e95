"""The transformers generation deployment (CPU, or one GPU without vLLM), with request batching.

Requests arrive as plain dicts built by the ingress (already validated)::

    {"model": adapter name or None, "messages": [...] | "prompt": str,
     "max_tokens": int, "temperature": float, "top_p": float, "stop": [str]}

``generate`` is a ``@serve.batch`` method: concurrent requests are padded on the left and run
through one ``model.generate`` call per (adapter, sampling) group. ``stream`` yields text deltas
for one request (``stream: true``). Results carry token counts for the OpenAI ``usage`` field and
``finish_reason`` (``stop`` on EOS or a stop string, ``length`` on ``max_tokens``). Problems that
are the client's (a prompt longer than the model's context) come back as ``{"error": msg}``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ray import serve

from trace_ray.chat import prompt_ids

GREEDY_BELOW = 0.01  # temperatures under this decode greedily (dividing logits by ~0 overflows)


def _apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string; (text, stopped)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class HFGenerator:
    """One replica: the base model, every LoRA adapter loaded beside it (peft), one tokenizer."""

    def __init__(self, base_spec: str, adapters: dict[str, str], max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, dtype: str = "float32", device: str | None = None):
        from trace_ray.models.load import load_model, load_tokenizer

        self.tok = load_tokenizer(base_spec, padding_side="left")
        model = load_model(base_spec, dtype=dtype, attn_implementation=None, device=device)
        if adapters:
            from peft import PeftModel

            names = list(adapters)
            model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(adapters[name], adapter_name=name)
            model.eval()
        self.model = model
        self.adapters = set(adapters)
        self.device = next(model.parameters()).device
        self.max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else self.tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(self.eos_ids))
        self._lock = threading.Lock()  # the batch path and the stream path share one model
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

    # -- prompt ------------------------------------------------------------------------------
    def _encode(self, req: dict) -> list[int]:
        if req.get("judge"):
            # A policy's judge question: rendered and left-truncated exactly as the offline judge
            # (trace_ray.policy.judge.HFJudge) does, so online and offline answers agree.
            from trace_ray.policy.judge import judge_ids

            return judge_ids(self.tok, req["messages"], max(8, (self.max_len or 4096) - req["max_tokens"]))
        if "messages" in req:
            # the same rendering as training and evaluation (trace_ray.chat)
            return prompt_ids(self.tok, [{"role": m["role"], "content": m["content"]} for m in req["messages"]])
        return self.tok(req["prompt"])["input_ids"]

    def _encode_checked(self, req: dict) -> tuple[list[int], str | None]:
        """Token ids, or an error message for the client (bad chat for the template, empty, too long)."""
        try:
            ids = self._encode(req)
        except Exception as e:  # e.g. a chat template that rejects this role order
            return [], f"the prompt could not be built: {type(e).__name__}: {str(e)[:200]}"
        if not ids:
            return [], "the prompt is empty (it encodes to no tokens)"
        return ids, self._check_len(ids, req["max_tokens"])

    def _check_len(self, ids: list[int], max_tokens: int) -> str | None:
        if self.max_len and len(ids) + max_tokens > self.max_len:
            return (f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                    f"of {self.max_len} tokens")
        return None

    def _adapter_ctx(self, adapter: str | None):
        import contextlib

        if not self.adapters:
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _gen_kwargs(self, req: dict, max_new: int) -> dict:
        temp = float(req.get("temperature", 1.0))
        kw: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": self.pad_id,
                              "eos_token_id": sorted(self.eos_ids)}
        if temp >= GREEDY_BELOW:
            kw.update(do_sample=True, temperature=temp, top_p=float(req.get("top_p", 1.0)))
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    # -- batched path ------------------------------------------------------------------------
    def _run_group(self, reqs: list[dict], encoded: list[list[int]]) -> list[dict]:
        import torch

        max_new = max(r["max_tokens"] for r in reqs)
        batch = self.tok.pad({"input_ids": encoded}, padding=True, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self._lock, torch.inference_mode(), self._adapter_ctx(reqs[0].get("model")):
            out = self.model.generate(**batch, **self._gen_kwargs(reqs[0], max_new))
        width = batch["input_ids"].shape[1]
        results = []
        for row, req, ids in zip(out[:, width:].tolist(), reqs, encoded):
            row = row[: req["max_tokens"]]
            finish = "length"
            for i, t in enumerate(row):
                if t in self.eos_ids:
                    row, finish = row[:i], "stop"
                    break
            text, stopped = _apply_stop(self.tok.decode(row, skip_special_tokens=True), req.get("stop") or [])
            results.append({"text": text, "finish_reason": "stop" if stopped else finish,
                            "prompt_tokens": len(ids), "completion_tokens": len(row)})
        return results

    def _run_batch(self, reqs: list[dict]) -> list[dict]:
        results: list[dict | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        encoded: list[list[int]] = []
        for i, r in enumerate(reqs):
            ids, err = self._encode_checked(r)
            encoded.append(ids)
            if err:
                results[i] = {"error": err}
                continue
            key = (r.get("model"), float(r.get("temperature", 1.0)), float(r.get("top_p", 1.0)))
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            for i, res in zip(idx, self._run_group([reqs[i] for i in idx], [encoded[i] for i in idx])):
                results[i] = res
        return results  # type: ignore[return-value]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, reqs: list[dict]) -> list[dict]:
        # generate() blocks; a worker thread keeps the replica's event loop answering.
        return await asyncio.to_thread(self._run_batch, reqs)

    # -- streaming path ----------------------------------------------------------------------
    async def stream(self, req: dict):
        """Yield ``{"delta": str}`` pieces, then ``{"finish_reason", "prompt_tokens", "completion_tokens"}``."""
        import torch
        from transformers import TextIteratorStreamer

        ids, err = self._encode_checked(req)
        if err:
            yield {"error": err}
            return
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        inputs = {"input_ids": torch.tensor([ids], device=self.device),
                  "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=self.device)}
        box: dict = {}
        halt = threading.Event()  # set when a stop string was seen: the model stops early

        def work():
            from transformers import StoppingCriteria, StoppingCriteriaList

            class _Halt(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    return halt.is_set()

            try:
                with self._lock, torch.inference_mode(), self._adapter_ctx(req.get("model")):
                    box["out"] = self.model.generate(**inputs, streamer=streamer,
                                                     stopping_criteria=StoppingCriteriaList([_Halt()]),
                                                     **self._gen_kwargs(req, req["max_tokens"]))
            except BaseException as e:  # surfaced below; the streamer must still end
                box["error"] = e
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        stops = [s for s in (req.get("stop") or []) if s]
        hold = max((len(s) for s in stops), default=1) - 1  # chars kept back: a stop may straddle pieces
        text, sent, stopped = "", 0, False
        it = iter(streamer)
        while True:
            piece = await asyncio.to_thread(next, it, None)
            if piece is None:
                break
            if stopped:
                continue  # drain the streamer until generate() returns
            text += piece
            if stops:
                cut, stopped = _apply_stop(text, stops)
                if stopped:
                    halt.set()
                    if len(cut) > sent:
                        yield {"delta": cut[sent:]}
                    sent = len(cut)
                    continue
            safe = len(text) - hold if stops else len(text)
            if safe > sent:
                yield {"delta": text[sent:safe]}
                sent = safe
        await asyncio.to_thread(thread.join)
        if "error" in box:
            raise box["error"]
        if not stopped and len(text) > sent:
            yield {"delta": text[sent:]}
        row = box["out"][0, len(ids):].tolist()
        n = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
        finish = "stop" if stopped or n is not None else "length"
        yield {"finish_reason": finish, "prompt_tokens": len(ids), "completion_tokens": len(row) if n is None else n}


def hf_deployment(opts) -> "serve.Deployment":
    """``HFGenerator`` as a Serve deployment sized by ``HFOptions``."""
    return serve.deployment(
        HFGenerator,
        name="HFGenerator",
        num_replicas=opts.num_replicas,
        ray_actor_options={"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
        max_ongoing_requests=max(16, 2 * opts.max_batch_size),
    )
