"""The transformers generation deployment (CPU, or one GPU without vLLM), with request batching.

Requests arrive as plain dicts built by the ingress (already validated)::

    {"model": adapter name or None, "messages": [...] | "prompts": [str, ...], "n": int,
     "max_tokens": int, "temperature": float, "top_p": float, "stop": [str], "seed": int | None,
     "logprobs": None | k (k alternatives per token, 0..20)}

One ``generate`` call serves many rows (every prompt × ``n``): ``generate`` is a ``@serve.batch``
method, so concurrent requests that share (adapter, temperature, top_p, stop strings) are
left-padded into one ``model.generate``; a request with a ``seed`` runs alone after
``torch.manual_seed(seed)``, so the same request gives the same answer whatever else is in flight.
``stream`` runs one request (all its rows) and yields text deltas per choice.

What the model produced is recorded per decoding step by ``Recorder``: the token each row took
and, when asked, its log-probability and the top-k alternatives from the model's raw logits (a
forward hook on the LM, i.e. before temperature / top-p, as vLLM reports them). Stop strings are
``generate``'s own ``StopStringCriteria`` (watched per row, so a finished row's padding is never
counted); the returned text is cut before the stop string, the usage counts every token the
model produced up to and including the one that completed it. EOS ends a row and is not counted.
Problems that are the client's (a prompt longer than the context) come back as ``{"error": msg}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

from ray import serve

from serve.decoding import Recorder, apply_stop
from trace_ray.chat import prompt_ids

log = logging.getLogger("ray.serve")
GREEDY_BELOW = 0.01  # temperatures under this decode greedily (dividing logits by ~0 overflows)



def peft_name(name: str) -> str:
    """The name an adapter has inside peft: a served name may hold dots (``trace_lr0.002``, a
    version ``policy-v1.2``), a torch module name may not, so each dot becomes ``_`` and a short
    hash of the served name keeps two such names apart."""
    if "." not in name:
        return name
    import hashlib

    return name.replace(".", "_") + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]

class HFGenerator:
    """One replica: the base model, every LoRA adapter loaded beside it (peft), one tokenizer.

    Adapters come from the deployment's ``user_config`` (``reconfigure``): Serve calls it when the
    replica starts and again whenever the app is redeployed with other adapters, without a
    restart. A reload waits for the generation in progress (one lock), then loads, replaces or
    drops adapters; requests queued meanwhile run on the new set.
    """

    def __init__(self, base_spec: str, adapters: dict | None = None, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, dtype: str = "float32", device: str | None = None):
        from trace_ray.models.load import load_model, load_tokenizer

        self.tok = load_tokenizer(base_spec, padding_side="left")
        self.model = load_model(base_spec, dtype=dtype, attn_implementation=None, device=device)
        self.loaded: dict[str, str] = {}  # adapter name -> signature of its files
        self.device = next(self.model.parameters()).device
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if eos is not None else self.tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(self.eos_ids))
        self._lock = threading.Lock()  # one generate() at a time; adapter reloads wait for it
        self._stops: dict = {}  # stop strings -> StopStringCriteria
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)
        if adapters:  # {name: folder}, built without Serve (tests); under Serve they come from user_config
            self._load_adapters({n: {"path": f, "sig": ""} for n, f in adapters.items()})

    # -- adapters (user_config) -------------------------------------------------------------------
    async def reconfigure(self, config: dict) -> None:
        """``{"adapters": {name: {"path": folder, "sig": str}}}`` — the adapters to serve now."""
        await asyncio.to_thread(self._load_adapters, (config or {}).get("adapters", {}))

    def _load_adapters(self, wanted: dict) -> None:
        from peft import PeftModel

        with self._lock:
            for name in [n for n in self.loaded if n not in wanted or wanted[n]["sig"] != self.loaded[n]]:
                self.model.delete_adapter(peft_name(name))
                del self.loaded[name]
            for name, spec in wanted.items():
                if name in self.loaded:
                    continue
                try:
                    if isinstance(self.model, PeftModel):
                        self.model.load_adapter(spec["path"], adapter_name=peft_name(name))
                    else:
                        self.model = PeftModel.from_pretrained(self.model, spec["path"], adapter_name=peft_name(name))
                except Exception:  # a broken folder: its requests get "no longer served", the rest go on
                    log.exception("adapter %s (%s) could not be loaded", name, spec["path"])
                    continue
                self.loaded[name] = spec["sig"]
            self.model.eval()

    def _adapter_ctx(self, adapter: str | None):
        if not self.loaded:
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        if adapter not in self.loaded:  # removed by a reload while the request waited
            raise KeyError(adapter)
        self.model.set_adapter(peft_name(adapter))
        return contextlib.nullcontext()

    def _lm(self):
        """The transformers model under any peft wrapper (the module whose output has ``logits``)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    # -- prompt ------------------------------------------------------------------------------
    def _encode(self, req: dict, prompt=None) -> list[int]:
        """Token ids of ``prompt`` (default: the request's ``messages``, else its first prompt)."""
        if prompt is None:
            prompt = req["messages"] if "messages" in req else req["prompts"][0]
        if req.get("judge"):
            # A policy's judge question: rendered and left-truncated exactly as the offline judge
            # (trace_ray.policy.judge.HFJudge) does, so online and offline answers agree.
            from trace_ray.policy.judge import judge_ids

            return judge_ids(self.tok, prompt, max(8, (self.max_len or 4096) - req["max_tokens"]))
        if isinstance(prompt, list):
            # the same rendering as training and evaluation (trace_ray.chat)
            return prompt_ids(self.tok, [{"role": m["role"], "content": m["content"]} for m in prompt])
        return self.tok(prompt)["input_ids"]

    def _encode_all(self, req: dict) -> tuple[list[list[int]], str | None]:
        """Token ids of each prompt of ``req``, or an error message for the client."""
        prompts = [req["messages"]] if "messages" in req else req["prompts"]
        out = []
        for p in prompts:
            try:
                ids = self._encode(req, p)
            except Exception as e:  # e.g. a chat template that rejects this role order
                return [], f"the prompt could not be built: {type(e).__name__}: {str(e)[:200]}"
            if not ids:
                return [], "the prompt is empty (it encodes to no tokens)"
            if self.max_len and len(ids) + req["max_tokens"] > self.max_len:
                return [], (f"prompt ({len(ids)} tokens) + max_tokens ({req['max_tokens']}) exceeds the model's "
                            f"context of {self.max_len} tokens")
            out.append(ids)
        return out, None

    # -- one generate() call -------------------------------------------------------------------
    def _gen_kwargs(self, req: dict, max_new: int) -> dict:
        temp = float(req.get("temperature", 1.0))
        kw: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": self.pad_id,
                              "eos_token_id": sorted(self.eos_ids)}
        if temp >= GREEDY_BELOW:  # top_k=0: no hidden top-k (transformers' default is 50)
            kw.update(do_sample=True, temperature=temp, top_p=float(req.get("top_p", 1.0)), top_k=0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def _generate(self, req: dict, rows: list[list[int]], rec: Recorder, max_new: int) -> None:
        """Run ``model.generate`` on ``rows`` (left-padded) with ``req``'s sampling, into ``rec``."""
        import torch
        from transformers import StoppingCriteriaList

        from trace_ray.chat import left_padded

        ids, mask = left_padded(self.tok, rows)
        stops = tuple(s for s in req.get("stop") or [] if s)
        with self._lock, torch.inference_mode(), self._adapter_ctx(req.get("model")):
            criteria = StoppingCriteriaList([rec.criterion(self._stop_criterion(stops) if stops else None)])
            hook = self._lm().register_forward_hook(rec.hook) if rec.top is not None else None
            try:
                if req.get("seed") is not None:
                    torch.manual_seed(int(req["seed"]))
                self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    streamer=rec, stopping_criteria=criteria, **self._gen_kwargs(req, max_new))
            finally:
                if hook is not None:
                    hook.remove()

    def _stop_criterion(self, stops: tuple[str, ...]):
        """generate's ``StopStringCriteria`` for ``stops`` (stateless; building one walks the whole
        vocabulary, ~0.1 s for 50k tokens, so the last 64 are kept)."""
        from transformers.generation.stopping_criteria import StopStringCriteria

        crit = self._stops.pop(stops, None) or StopStringCriteria(self.tok, list(stops))
        self._stops[stops] = crit  # most recently used last
        while len(self._stops) > 64:
            self._stops.pop(next(iter(self._stops)))
        return crit

    def _finish(self, req: dict, rec: Recorder, r: int) -> dict:
        """Row ``r`` as one choice: text (cut before a stop string), finish_reason, tokens, logprobs."""
        ids, limit = rec.ids[r][: req["max_tokens"]], req["max_tokens"]
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        if rec.stop_at[r] is not None and (end is None or rec.stop_at[r] < end):
            end = rec.stop_at[r]
        finish = "stop" if end is not None or len(ids) < limit else "length"
        ids = ids[:end] if end is not None else ids
        text, _ = apply_stop(self.tok.decode(ids, skip_special_tokens=True), req.get("stop") or [])
        return {"text": text, "finish_reason": finish, "completion_tokens": len(ids),
                "logprobs": self._logprobs(ids, rec.lps[r]) if rec.top is not None and req.get("logprobs") is not None
                else None, "_ids": ids}

    def _logprobs(self, ids: list[int], lps: list[tuple], start: int = 0) -> list[dict]:
        """One entry per token from ``start``: its text, log-probability, the offset where it starts in
        the choice's text, and the alternatives (token text, log-probability)."""
        out = []
        for k in range(start, len(ids)):
            lp, alts = lps[k]
            out.append({"token": self.tok.decode([ids[k]]), "logprob": lp,
                        "offset": len(self.tok.decode(ids[:k], skip_special_tokens=True)),
                        "top": [[self.tok.decode([a]), v] for a, v in alts]})
        return out

    # -- batched path ------------------------------------------------------------------------
    def _run_batch(self, reqs: list[dict]) -> list[dict]:
        results: list[dict] = [{} for _ in reqs]
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}  # key -> [(request index, prompt ids)] × n
        for i, r in enumerate(reqs):
            encoded, err = self._encode_all(r)
            if err:
                results[i] = {"error": err}
                continue
            results[i] = {"prompt_tokens": sum(len(e) for e in encoded), "choices": []}
            seeded = ("seed", r["seed"], i) if r.get("seed") is not None else None  # a seeded request runs alone
            key = (r.get("model"), float(r.get("temperature", 1.0)), float(r.get("top_p", 1.0)),
                   tuple(s for s in r.get("stop") or [] if s), seeded)
            groups.setdefault(key, []).extend((i, e) for e in encoded for _ in range(r.get("n", 1)))
        for members in groups.values():
            first = reqs[members[0][0]]
            tops = [reqs[i]["logprobs"] for i, _ in members if reqs[i].get("logprobs") is not None]
            rec = Recorder(len(members), max(tops) if tops else None)
            try:
                self._generate(first, [e for _, e in members], rec, max(reqs[i]["max_tokens"] for i, _ in members))
            except KeyError as e:  # the adapter was removed by a reload
                for i, _ in members:
                    results[i] = {"error": f"model adapter {e} is no longer served"}
                continue
            for r, (i, _) in enumerate(members):
                if "choices" in results[i]:
                    choice = self._finish(reqs[i], rec, r)
                    choice.pop("_ids")
                    if choice["logprobs"] is not None:  # alternatives beyond what this request asked for
                        for e in choice["logprobs"]:
                            e["top"] = e["top"][: reqs[i]["logprobs"]]
                    results[i]["choices"].append(choice)
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, reqs: list[dict]) -> list[dict]:
        """Each request → ``{"prompt_tokens", "choices": [{"text", "finish_reason",
        "completion_tokens", "logprobs"}] (prompt-major, n per prompt)}`` or ``{"error"}``."""
        # generate() blocks; a worker thread keeps the replica's event loop answering.
        return await asyncio.to_thread(self._run_batch, reqs)

    # -- streaming path ----------------------------------------------------------------------
    async def stream(self, req: dict):
        """Yield ``{"index", "delta", "logprobs"}`` pieces (choices interleaved), then one
        ``{"index", "finish_reason", "completion_tokens", ...}`` per choice, then ``{"prompt_tokens"}``."""
        encoded, err = self._encode_all(req)
        if err:
            yield {"error": err}
            return
        n = req.get("n", 1)
        rows = [e for e in encoded for _ in range(n)]
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        rec = Recorder(len(rows), req.get("logprobs"), on_step=lambda: loop.call_soon_threadsafe(wake.set))
        work = asyncio.ensure_future(asyncio.to_thread(self._generate, req, rows, rec, req["max_tokens"]))
        work.add_done_callback(lambda _: wake.set())
        stops = [s for s in req.get("stop") or [] if s]
        hold = max((len(s) for s in stops), default=1) - 1  # a stop string may straddle two pieces
        sent = [0] * len(rows)  # characters sent per choice
        sent_tok = [0] * len(rows)  # logprob entries sent per choice
        want_lp = req.get("logprobs") is not None
        try:
            async for piece in self._pieces(req, rec, work, wake, len(rows), hold, stops, sent, sent_tok, want_lp):
                yield piece
        finally:
            rec.cancelled = not work.done()  # the client left (or the stream failed): stop generating
        work.result()  # a failure in generate() surfaces here
        total = 0
        for r in range(len(rows)):
            final = self._finish(req, rec, r)
            total += final["completion_tokens"]
            rest = final["logprobs"][sent_tok[r]:] if final["logprobs"] is not None else None
            yield {"index": r, "delta": final["text"][sent[r]:], "logprobs": rest,
                   "finish_reason": final["finish_reason"], "completion_tokens": final["completion_tokens"]}
        yield {"prompt_tokens": sum(len(e) for e in encoded), "completion_tokens": total}

    async def _pieces(self, req, rec, work, wake, rows, hold, stops, sent, sent_tok, want_lp):
        """Deltas of every choice as the steps come, text held back where a stop string or an
        incomplete UTF-8 character may still be forming; ``sent`` / ``sent_tok`` are advanced."""
        while not work.done():
            await wake.wait()
            wake.clear()
            for r in range(rows):
                ids = rec.ids[r][: req["max_tokens"]]
                end = next((i for i, t in enumerate(ids) if t in self.eos_ids), rec.stop_at[r])
                ids = ids[:end] if end is not None else ids
                text = self.tok.decode(ids, skip_special_tokens=True)
                cut, stopped = apply_stop(text, stops)
                safe = len(cut) if stopped else len(text) - hold
                while safe > sent[r] and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 character
                    safe -= 1
                if safe <= sent[r]:
                    continue
                entries = []  # the logprobs of the tokens whose text is now wholly sent
                while want_lp and sent_tok[r] < len(ids) and len(
                        self.tok.decode(ids[: sent_tok[r] + 1], skip_special_tokens=True)) <= safe:
                    entries += self._logprobs(ids[: sent_tok[r] + 1], rec.lps[r], sent_tok[r])
                    sent_tok[r] += 1
                yield {"index": r, "delta": text[sent[r]:safe], "logprobs": entries if want_lp else None}
                sent[r] = safe


def hf_deployment(opts) -> "serve.Deployment":
    """``HFGenerator`` as a Serve deployment sized by ``HFOptions``."""
    return serve.deployment(
        HFGenerator,
        name="HFGenerator",
        num_replicas=opts.num_replicas,
        ray_actor_options={"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
        max_ongoing_requests=max(16, 2 * opts.max_batch_size),
    )
